"""Training from a large token shard (``data=tokens``) vs the in-memory path (``data=default``
on the bundled corpus, tokenized into a datasets cache at start-up): training tokens/s and the
peak resident memory of each, each run in a fresh process, same model, batch and steps.

The shard (``--gb`` of uint16 token ids with a document every ~600 tokens, random ids, written
with numpy in chunks: the point is its size, not its text) is made once under ``--work``.
Appends one record to results/token_shards.jsonl.

    python benchmarks/token_shards.py [--gb 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CHILD = r"""
import json, resource, sys, time
import llmzoo
overrides = json.loads(sys.argv[1])
t0 = time.perf_counter()
summary = llmzoo.train(llmzoo.compose("train", overrides))
seconds = time.perf_counter() - t0
print(json.dumps({"summary": summary, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_shard(folder: Path, gb: float) -> None:
    from llmzoo.api import build_tokenizer
    from llmzoo.config import compose
    from llmzoo.shared.tokens import fingerprint

    if (folder / "index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(compose("train", ["model=tiny"]))
    n = int(gb * 2**30) // 2
    rng = np.random.default_rng(0)
    with open(folder / "shard-00000.bin", "wb") as fh:
        for start in range(0, n, 1 << 26):
            rng.integers(0, tok.vocab_size, min(1 << 26, n - start), dtype=np.uint16).tofile(fh)
    np.arange(0, n, 600, dtype=np.int64).tofile(folder / "shard-00000.docs.bin")
    tok.save(folder / "tokenizer")
    (folder / "index.json").write_text(json.dumps({
        "format": "llmzoo-tokens", "version": 1, "dtype": "uint16", "vocab_size": tok.vocab_size,
        "tokenizer": fingerprint(tok), "shards": [{"tokens": "shard-00000.bin", "docs": "shard-00000.docs.bin",
                                                   "n_tokens": n, "n_docs": len(range(0, n, 600))}]}))


def child(overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work", default=str(HERE / ".work" / "token_shards"))
    args = p.parse_args()
    work = Path(args.work)
    make_shard(work / "tokens", args.gb)
    common = ["model=tiny", f"trainer.max_steps={args.steps}", "trainer.val_every=0", "logger=[]",
              "sample.prompts=[]", "trainer.enable_progress_bar=false", "data.packing=document"]
    runs = {}
    for name, extra in (("in_memory", []), ("token_shard", ["data=tokens", f"data.path={work / 'tokens'}"])):
        r = child([*common, *extra, f"run_dir={work / name}", "overwrite=true"])
        runs[name] = {"tokens_per_s": r["summary"]["tokens_seen"] / r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                      "seconds": r["seconds"]}
        print(f"{name:>12}: {runs[name]['tokens_per_s']:.0f} tokens/s (whole run, start-up included), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    record = {"time": time.strftime("%Y-%m-%d %H:%M"), "shard_gb": args.gb, "steps": args.steps, "runs": runs,
              "ratio": runs["token_shard"]["tokens_per_s"] / runs["in_memory"]["tokens_per_s"]}
    with open(HERE / "results" / "token_shards.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"token shard / in memory tokens/s: {record['ratio']:.2f}")


if __name__ == "__main__":
    main()
