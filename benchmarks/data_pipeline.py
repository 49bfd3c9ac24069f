"""llmzoo-data throughput and dedup quality on a generated corpus, side by side in one run:

  filters   length + Gopher repetition + Gopher quality + C4 (datatrove), documents/s per
            core with 1 and with 2 worker processes (2 tasks)
  minhash   the MinHash stage (5-gram shingles, 14 bands x 8 rows) documents/s, and recall /
            precision of the whole dedup on planted near-duplicates
  datasketch  datasketch's MinHash + MinHashLSH (same shingles, 112 permutations, threshold
            0.72) in this process: documents/s and recall / precision on the same documents

The corpus: English-like documents of ~150 words from a 300-word vocabulary; every 10th is a
near copy (5 words changed) of an earlier one. ``--mb`` sets its size. Each stage reports wall
seconds and CPU seconds (this process and its workers), so documents per CPU-second stay
comparable when something else shares the machine; the scaling from 1 to 2 processes is a
wall-clock figure and needs the cores to itself.

    python benchmarks/data_pipeline.py --mb 1024     # ~1 h 45 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_pipeline.jsonl"


def make_corpus(folder: Path, mb: float, seed: int = 0) -> tuple[int, set[tuple[int, int]]]:
    """Writes 2 jsonl files; returns (documents, {(original id, copy id)})."""
    rng = random.Random(seed)
    vocab = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it"] + \
        ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(290)]
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"part{i}.jsonl", "w") for i in range(2)]
    docs, size, pairs, texts = 0, 0, set(), []
    while size < mb * 2**20:
        if docs % 10 == 9 and texts:
            j = rng.randrange(len(texts))
            words = texts[j][1].split(" ")
            for k in rng.sample(range(len(words)), 5):
                words[k] = rng.choice(vocab)
            text = " ".join(words)
            pairs.add((texts[j][0], docs))
        else:
            words = [rng.choice(vocab) for _ in range(150)]
            text = " ".join(" ".join(words[i:i + 10]).capitalize() + "." for i in range(0, 150, 10))
            texts.append((docs, text))
            texts = texts[-1000:]
        files[docs % 2].write(json.dumps({"text": text, "id": str(docs)}) + "\n")
        docs, size = docs + 1, size + len(text)
    for f in files:
        f.close()
    return docs, pairs


def kept_ids(folder: Path) -> set[int]:
    return {int(json.loads(line)["id"]) for f in folder.glob("*.jsonl") for line in open(f) if line.strip()}


def quality(kept: set[int], pairs: set[tuple[int, int]], docs: int) -> dict:
    """recall: of the planted copies, the share removed (at most all but one of each group of
    an original and its copies); precision: the share of removals that were such copies."""
    groups: dict[int, set[int]] = {}
    for a, b in pairs:
        groups.setdefault(a, {a}).add(b)
    removed = {i for i in range(docs) if i not in kept}
    right = sum(min(len(g & removed), len(g) - 1) for g in groups.values())
    return {"recall": right / len(pairs), "precision": right / max(1, len(removed))}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the worker processes it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pipeline(raw: Path, out: Path, overrides: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one llmzoo-data run."""
    import llmzoo
    from llmzoo_plugins.data_pipeline import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    run_pipeline(llmzoo.compose("data_pipeline", [f"input={raw}", f"output={out}", *overrides], validate=False))
    return time.perf_counter() - t0, cpu_seconds() - c0


def stage(name: str, docs: int, wall: float, cpu: float | None, **more) -> dict:
    """One stage's record; ``cpu`` None where the workers' CPU time is not visible (datatrove
    starts them from its own process pool, not as this process's children)."""
    row = {"seconds": wall, "docs_per_s": docs / wall, **more}
    if cpu is not None:
        row.update(cpu_seconds=cpu, docs_per_cpu_s=docs / cpu)
    print(f"{time.strftime('%H:%M:%S')} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def datasketch_run(raw: Path, docs: int, pairs: set) -> dict:
    from datasketch import MinHash, MinHashLSH

    t0, c0 = time.perf_counter(), cpu_seconds()
    lsh, kept = MinHashLSH(threshold=0.72, num_perm=112), set()
    for f in sorted(raw.glob("*.jsonl")):
        for line in open(f):
            row = json.loads(line)
            words = re.findall(r"\w+", row["text"].lower())
            m = MinHash(num_perm=112, seed=1)
            m.update_batch([" ".join(words[i:i + 5]).encode() for i in range(len(words) - 4)])
            if not lsh.query(m):
                lsh.insert(row["id"], m)
                kept.add(int(row["id"]))
    return stage("datasketch", docs, time.perf_counter() - t0, cpu_seconds() - c0, **quality(kept, pairs, docs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--work", default="/tmp/llmzoo_data_bench")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    docs, pairs = make_corpus(work / "raw", a.mb)
    print(f"corpus: {docs} documents, {a.mb} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rec = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "mb": a.mb, "documents": docs, "planted_pairs": len(pairs)}
    filters = "filter=[length,gopher_repetition,gopher_quality,c4]"
    for workers in (2, 1):  # the 2-process run first: it needs both cores quiet
        wall, cpu = pipeline(work / "raw", work / f"filters_{workers}", [filters, "dedup=none", "executor.tasks=2",
                                                                         f"executor.workers={workers}"])
        cpu = cpu if workers == 1 else None  # the pool's workers are not this process's children
        rec[f"filters_{workers}_workers"] = stage(f"filters, {workers} workers", docs, wall, cpu,
                                                  docs_per_s_per_core=docs / wall / workers)
        shutil.rmtree(work / f"filters_{workers}", ignore_errors=True)
    wall, cpu = pipeline(work / "raw", work / "minhash", ["filter=[]", "dedup=minhash", "executor.tasks=2",
                                                          "executor.workers=1"])
    rec["minhash_dedup"] = stage("minhash", docs, wall, cpu, **quality(kept_ids(work / "minhash" / "data"), pairs, docs))
    shutil.rmtree(work / "minhash", ignore_errors=True)
    try:
        rec["datasketch"] = datasketch_run(work / "raw", docs, pairs)
    except ImportError:
        rec["datasketch"] = "not installed (pip install datasketch)"
    print(json.dumps(rec, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
