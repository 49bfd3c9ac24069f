"""Parallel strategies on CPU against one process, in one run: training tokens/s and the
parameter + AdamW bytes each process holds, for parallel=single (1 process, batch B),
ddp and fsdp (2 processes, batch B/2 each: the same global batch), tp and pipeline
(2 processes sharing each batch of B: split layers / split stages, 4 micro-batches).

    python benchmarks/parallel.py [--steps 30] [--model small]

Runs the real CLI (Lightning's launcher starts the processes); appends one record to
results/parallel.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmzoo.shared.flops import device_description

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def run(strategy: str, devices: int, batch: int, steps: int, model: str, out: Path) -> dict:
    cmd = [str(BIN / "llmzoo-train"), f"parallel={strategy}", f"trainer.devices={devices}", "trainer.accelerator=cpu",
           f"data.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.val_every=0", f"model={model}",
           "data.seq_len=128", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
           "logger=[]", "sample.prompts=[]", f"run_dir={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "run_summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        # (name, strategy, processes, data-parallel ranks: each gets batch / ranks sequences)
        for name, strategy, devices, dp in (("single", "single", 1, 1), ("ddp", "ddp", 2, 2), ("fsdp", "fsdp", 2, 2),
                                            ("tp", "tp", 2, 1), ("pipeline", "pipeline", 2, 1)):
            s = run(strategy, devices, args.batch // dp, args.steps, args.model, Path(d) / name)
            results[name] = {k: s.get(k) for k in ("tokens_per_s", "param_mb_per_process", "optimizer_mb_per_process")}
            print(name, results[name], flush=True)
    base = results["single"]
    for r in results.values():
        r["tokens_per_s_vs_single"] = r["tokens_per_s"] / base["tokens_per_s"] if r["tokens_per_s"] else None
        r["state_per_process_vs_single"] = ((r["param_mb_per_process"] + r["optimizer_mb_per_process"])
                                            / (base["param_mb_per_process"] + base["optimizer_mb_per_process"]))
    record = {"benchmark": "parallel", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_description(),
              "model": args.model, "global_batch": args.batch, "seq_len": 128, "steps": args.steps, "results": results}
    with open(HERE / "results" / "parallel.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
