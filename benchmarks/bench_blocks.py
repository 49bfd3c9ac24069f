"""Blocks side by side, in one run (CPU unless CUDA is present):

1. training tokens/s, peak memory, total and active parameters for each block at
   equal dim and n_layers (each block in a fresh process, so peak RSS is its own);
2. decode time per token at a short and a long context: attention grows with the
   context, Mamba stays flat;
3. the chunked Mamba scans against the step-by-step recurrence at T=1024;
4. the dispatched MoE (``torch`` backend) against the dense per-expert loop.

    python benchmarks/bench_blocks.py [bench.blocks=[dense,mamba2]] [bench.train.steps=10]
    python benchmarks/report.py

Appends one JSON record to ``bench.out``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import llmzoo
from llmzoo.shared.flops import device_description


def shape_overrides(shape: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in shape.items()]


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters used per token: MoE experts count top_k / n_experts of their weights."""
    total = model.num_parameters()
    for m in model.modules():
        if hasattr(m, "w_gate_up") and hasattr(m, "top_k"):
            expert = m.w_gate_up.numel() + m.w_down.numel()
            total -= expert * (m.n_experts - m.top_k) // m.n_experts
    return total


def _train_worker(block: str, shape: dict, tr: dict, queue) -> None:
    from llmzoo_plugins.clm import next_token_loss

    torch.manual_seed(0)
    cfg = llmzoo.compose(overrides=[f"block={block}", *shape_overrides(shape)])
    model = llmzoo.build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.vocab_size, (tr["batch_size"], tr["seq_len"]), generator=g)
            for _ in range(tr["warmup"] + tr["steps"])]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, ids in enumerate(data):
        if i == tr["warmup"]:
            t0 = time.perf_counter()
        out = model(ids)
        loss = next_token_loss(out.logits, ids)[0] + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    queue.put({"block": block, "tokens_per_s": tr["steps"] * tr["batch_size"] * tr["seq_len"] / seconds,
               "params_total": model.num_parameters(), "params_active": active_parameters(model),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_before_training_mb": rss_before / 1024})


def bench_training(b: DictConfig) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for block in b.blocks:
        q = ctx.Queue()
        p = ctx.Process(target=_train_worker, args=(block, OmegaConf.to_container(b.shape),
                                                    OmegaConf.to_container(b.train), q))
        p.start()
        rows.append(q.get())
        p.join()
        print(f"train {block}: {rows[-1]['tokens_per_s']:.0f} tok/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB")
    return rows


@torch.no_grad()
def bench_decode(b: DictConfig) -> list[dict]:
    rows = []
    for block in b.decode.blocks:
        torch.manual_seed(0)
        model = llmzoo.build_model(llmzoo.compose(overrides=[f"block={block}", *shape_overrides(b.shape)])).eval()
        for ctx_len in b.decode.contexts:
            states = model.init_states(1, ctx_len + b.decode.tokens + 1)
            model(torch.randint(0, model.vocab_size, (1, ctx_len)), states=states)
            tok = torch.zeros(1, 1, dtype=torch.long)
            model(tok, states=states)  # warm
            t0 = time.perf_counter()
            for _ in range(b.decode.tokens):
                model(tok, states=states)
            ms = (time.perf_counter() - t0) / b.decode.tokens * 1e3
            rows.append({"block": block, "context": ctx_len, "ms_per_token": ms})
            print(f"decode {block} @ {ctx_len}: {ms:.2f} ms/token")
    return rows


def _best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_scans(b: DictConfig) -> list[dict]:
    from llmzoo_plugins.mamba import (selective_scan_compiled, selective_scan_fast, selective_scan_reference,
                                      ssd_chunked, ssd_reference)

    T, g = b.scan.seq_len, torch.Generator().manual_seed(0)
    m1 = (torch.randn(1, T, 256, generator=g), torch.rand(1, T, 256, generator=g) * 0.1,
          -torch.rand(256, 16, generator=g), torch.randn(1, T, 16, generator=g), torch.randn(1, T, 16, generator=g))
    m2 = (torch.randn(1, T, 8, 32, generator=g), torch.rand(1, T, 8, generator=g) * 0.1, -torch.rand(8, generator=g),
          torch.randn(1, T, 8, 32, generator=g), torch.randn(1, T, 8, 32, generator=g))
    rows = []
    with torch.no_grad():
        for name, ref, fast, args in (("mamba1_selective_scan (lean step loop)", selective_scan_reference,
                                       selective_scan_fast, m1),
                                      ("mamba1_selective_scan (torch.compile, chunks of 128)", selective_scan_reference,
                                       selective_scan_compiled, m1),
                                      ("mamba2_ssd (chunked, chunk 64)", ssd_reference, ssd_chunked, m2)):
            t_ref = _best_time(lambda: ref(*args), b.scan.repeats)
            t_fast = _best_time(lambda: fast(*args), b.scan.repeats)
            rows.append({"scan": name, "seq_len": T, "reference_ms": t_ref * 1e3, "fast_ms": t_fast * 1e3,
                         "speedup": t_ref / t_fast})
            print(f"scan {name}: {t_ref / t_fast:.1f}x")
    return rows


def bench_moe(b: DictConfig) -> dict:
    from llmzoo_plugins.moe import MoE

    m = b.moe
    torch.manual_seed(0)
    ref = MoE(m.dim, m.n_experts, m.top_k, m.hidden, backend="reference")
    fast = MoE(m.dim, m.n_experts, m.top_k, m.hidden, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(m.tokens, m.dim, requires_grad=True)

    def step(mod):
        return lambda: mod(x).sum().backward()

    t_ref, t_fast = _best_time(step(ref), m.repeats), _best_time(step(fast), m.repeats)
    print(f"moe torch vs per-expert loop: {t_ref / t_fast:.2f}x")
    return {**OmegaConf.to_container(m), "reference_ms": t_ref * 1e3, "torch_ms": t_fast * 1e3,
            "speedup": t_ref / t_fast, "grouped_mm": hasattr(torch, "_grouped_mm")}


@hydra.main(config_path="pkg://llmzoo_conf", config_name="bench_blocks", version_base="1.3")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    record = {"benchmark": "blocks", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "device": device_description(),
              "torch": torch.__version__, "shape": OmegaConf.to_container(b.shape),
              "train_batch": OmegaConf.to_container(b.train)}
    record["train"] = bench_training(b)
    record["decode"] = bench_decode(b)
    record["scan"] = bench_scans(b)
    record["moe"] = bench_moe(b)
    out = Path(hydra.utils.to_absolute_path(b.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1)[:3000])


if __name__ == "__main__":
    main()
