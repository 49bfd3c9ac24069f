"""Fused linear cross-entropy (``objective.fused_ce=true``) against the logits path, side by
side in one run: forward + backward time and peak memory.

  loss   the head and the loss alone: hidden (N, D) and head weight (V, D) in, d(hidden)
         and d(weight) out. Variants: ``logits`` (hidden @ W.T, then F.cross_entropy, as
         objective=clm without fusion), ``reference`` (llmzoo.losses' chunked PyTorch
         function), ``liger`` (Liger-Kernel's Triton kernel; CUDA only)
  train  one training step (forward, backward, AdamW) of ``--model`` with a ``--vocab``
         vocabulary, objective=clm with fused_ce false / true

Peak memory is the CUDA allocator's peak over the step, or on CPU the growth of the
process's peak resident set over the step (each variant in its own process).

    python benchmarks/fused_ce.py                                # CPU defaults, records to results/fused_ce.jsonl
    python benchmarks/fused_ce.py --device cuda --tokens 16384 --dim 4096 --vocab 128256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmzoo
from llmzoo.shared.flops import device_description
from llmzoo.losses import run_objective
from llmzoo.shared.losses import linear_cross_entropy

HERE = Path(__file__).parent
LOSS_VARIANTS = ("logits", "reference", "liger")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _timed(step, device: str, iters: int) -> tuple[float, float]:
    """(median seconds of ``step``, peak bytes it added), after one warm-up call."""
    step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return statistics.median(times), max(0, peak - base)


def loss_step(variant: str, args) -> dict:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=args.device).manual_seed(0)
    h = (torch.randn(args.tokens, args.dim, generator=g, device=args.device) * 1.0).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, generator=g, device=args.device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=args.device)
    out = {}

    def step():
        h.grad = w.grad = None
        if variant == "logits":
            loss = F.cross_entropy((h @ w.t()).float(), t)
        else:
            loss = linear_cross_entropy(h, w, t, chunk_size=args.chunk, backend=variant)[0]
        loss.backward()
        out["loss"] = loss.item()

    sec, peak = _timed(step, args.device, args.iters)
    return {"part": "loss", "variant": variant, "ms": sec * 1e3, "peak_mib": peak / 2**20, "loss": out["loss"],
            "grad_hidden_norm": h.grad.float().norm().item()}


def train_step(variant: str, args) -> dict:
    cfg = llmzoo.compose(overrides=[f"model={args.model}", f"model.max_seq_len={args.seq}",
                                    f"objective.fused_ce={str(variant == 'fused').lower()}",
                                    f"objective.fused_chunk={args.chunk}"])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = llmzoo.build_model(cfg, vocab_size=args.vocab)
    objective = llmzoo.build_objective(cfg, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=args.device).manual_seed(0)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g, device=args.device)}
    losses = []

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = run_objective(model, objective, batch).value
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    sec, peak = _timed(step, args.device, args.iters)
    return {"part": "train", "variant": variant, "ms": sec * 1e3, "peak_mib": peak / 2**20, "first_loss": losses[0],
            "tokens_per_s": args.batch * args.seq / sec, "params": model.num_parameters()}


def _child(part: str, variant: str, argv: list[str]) -> dict:
    """Run one variant in a fresh process (CPU peak memory is per process)."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--only", f"{part}:{variant}"], capture_output=True,
                          text=True)
    if proc.returncode:
        return {"part": part, "variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="loss part's tensors")
    p.add_argument("--tokens", type=int, default=4096, help="loss part: rows N")
    p.add_argument("--dim", type=int, default=512, help="loss part: hidden size D")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary V (both parts)")
    p.add_argument("--chunk", type=int, default=1024, help="objective.fused_chunk / the reference's rows per block")
    p.add_argument("--model", default="small", help="train part: the model= preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--parts", default="loss,train")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fused_ce.jsonl")
    p.add_argument("--only", help=argparse.SUPPRESS)  # part:variant, in a child process
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here", file=sys.stderr)
        return 2
    if args.only:
        part, variant = args.only.split(":")
        print(json.dumps((loss_step if part == "loss" else train_step)(variant, args)))
        return 0
    rows = []
    parent = [a for a in argv if not a.startswith("--only")]
    for part in args.parts.split(","):
        variants = LOSS_VARIANTS if part == "loss" else ("logits", "fused")
        for variant in variants:
            if variant == "liger" and args.device != "cuda":
                continue
            row = _child(part, variant, parent) if args.device == "cpu" else (
                loss_step if part == "loss" else train_step)(variant, args)
            rows.append(row)
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for part in ("loss", "train"):
        base = next((r for r in rows if r["part"] == part and r["variant"] == "logits" and "ms" in r), None)
        for r in rows:
            if base and r["part"] == part and "ms" in r:
                r["speed_vs_logits"] = base["ms"] / r["ms"]
                r["memory_vs_logits"] = r["peak_mib"] / max(base["peak_mib"], 1e-9)
    record = {"benchmark": "fused_ce", "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device_description(), "torch": torch.__version__,
              "shape": {k: getattr(args, k) for k in ("tokens", "dim", "vocab", "chunk", "dtype", "model", "batch", "seq")},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
