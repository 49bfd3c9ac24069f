"""Turn benchmark records (benchmarks/results/*.jsonl) into markdown tables.

    python benchmarks/report.py [results/train_vs_hf.jsonl ...]

Prints one table per benchmark, newest record last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def train_vs_hf_rows(records: list[dict]) -> str:
    head = ("| when | commit | device | model (params) | batch x seq | llmzoo+Lightning tok/s | llmzoo plain tok/s "
            "| HF Llama tok/s | llmzoo+Lightning / HF | Lightning overhead |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        t = r["tokens_per_s"]
        m = r["model"]
        rows.append(f"| {r['time']} | {r['commit']} | {r['device']} | dim {m['dim']}, {m['n_layers']} layers "
                    f"({r['params']['llmzoo'] / 1e6:.1f}M) | {r['batch_size']}x{r['seq_len']} "
                    f"| {t['llmzoo_lightning']:.0f} | {t['llmzoo_plain_loop']:.0f} | {t['hf_llama_plain_loop']:.0f} "
                    f"| **{r['ratio_llmzoo_lightning_vs_hf']:.2f}x** | {100 * r['lightning_overhead']:.1f}% |")
    return head + "\n" + "\n".join(rows)


RENDER = {"train_vs_hf": train_vs_hf_rows}


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted((HERE / "results").glob("*.jsonl"))
    for f in files:
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        by_kind: dict[str, list[dict]] = {}
        for r in records:
            by_kind.setdefault(r["benchmark"], []).append(r)
        for kind, recs in by_kind.items():
            print(f"### {kind} ({f.name})\n")
            print(RENDER[kind](recs) if kind in RENDER else "\n".join(json.dumps(r) for r in recs))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
