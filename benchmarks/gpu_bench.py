"""The GPU headline figures, one JSON record per line in ``--out`` (appended as each
section finishes, so a section that fails or runs out of time loses nothing before it):

  train_1b      1B dense preset (model=1b), bf16 autocast, AdamW(fused): eager, compiled
                blocks (our trainer.compile), compiled + kernels=liger + Liger's fused
                linear cross-entropy (objective.fused_ce=true). Tokens/s and MFU
                (3 x model.flops_per_token / the GPU's bf16 dense peak)
  fsdp_ac       the same model through our FSDP strategy's parallelize (FSDP2, one
                process, bf16 parameters), activation checkpointing off / on: tokens/s
                and peak memory
  decode_7b     a 7B Llama shape in bf16, batch 1: decoder=static (CUDA graphs) and eager
                greedy; tokens/s as a share of the HBM roofline (bytes read per token:
                every weight but the embedding table, plus the KV cache up to the context)
  moe           MoE layer forward + backward, grouped GEMM (backend=torch) vs the
                per-expert loop (backend=reference), bf16
  mamba2        Mamba-2 mixer forward + backward: fla-core's Triton kernel
                (backend=triton) vs our chunked PyTorch SSD (backend=torch)
  kernels       Liger RMSNorm / SwiGLU / RoPE vs the references, forward + backward
  fused_ce      head + cross-entropy forward + backward at a Llama-3 shape (16k tokens,
                D=4096, V=128256, bf16): full logits vs llmzoo's chunked reference vs
                Liger's fused kernel (benchmarks/fused_ce.py); ms and peak memory

    python benchmarks/gpu_bench.py --out results.jsonl [--sections train_1b,decode_7b]

Each section checks its fast path against the reference before timing it. It needs
hydra-core (the configs are composed); benchmarks/gpu_suite.sh installs it from wheels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import llmzoo
from llmzoo.losses import run_objective
from llmzoo.shared.flops import device_description, device_peak_flops

# HBM bandwidth (bytes/s, datasheet) of GPUs whose name contains the key.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def hbm_bandwidth() -> float:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), float("nan"))


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ============================================================================ sections
def _train_step(model, objective, opt, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = run_objective(model, objective, batch).value
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train_1b(args) -> dict:
    from llmzoo.training import compile_blocks

    B, T = args.batch, args.seq
    peak, peak_src = device_peak_flops("cuda")
    variants = {"eager": ([], False), "compiled": ([], True),
                "compiled+liger": (["kernels=liger", "objective.fused_ce=true"], True)}
    out = {}
    for name, (overrides, compiled) in variants.items():
        torch._dynamo.reset()
        cfg = llmzoo.compose(overrides=["model=1b", "block=dense", f"model.max_seq_len={T}"] + overrides)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = llmzoo.build_model(cfg)
        if compiled:
            compile_blocks(model)
        objective = llmzoo.build_objective(cfg, model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, cfg.model.vocab_size, (B, T), device="cuda")
        batch = {"input_ids": ids}
        t0 = time.perf_counter()
        first = _train_step(model, objective, opt, batch).item()
        warm_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        sec = cuda_time(lambda: _train_step(model, objective, opt, batch), iters=args.iters)
        tps = B * T / sec
        fpt = model.flops_per_token(T)
        out[name] = {"tokens_per_s": tps, "step_s": sec, "mfu": 3 * fpt * tps / peak, "first_step_s": warm_s,
                     "first_loss": first, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(f"  train_1b {name}: {tps:,.0f} tok/s, MFU {out[name]['mfu']:.1%}, first step {warm_s:.0f} s",
              flush=True)
        params = model.num_parameters()
        del model, opt, objective
        torch.cuda.empty_cache()
    return {"batch": B, "seq_len": T, "params": params, "peak_flops": peak, "peak_source": peak_src,
            "variants": out, "mfu_convention": "3 x model.flops_per_token(seq_len) (full, non-causal attention "
                                                "matmuls counted) / bf16 dense peak"}


def fsdp_ac(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llmzoo_plugins.fsdp import FSDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("data_parallel",))
    B, T = args.batch, args.seq
    out = {}
    for ac in (False, True):
        cfg = llmzoo.compose(overrides=["model=1b", "block=dense", f"model.max_seq_len={T}"])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = llmzoo.build_model(cfg)
        FSDP(devices=1, mixed_precision="bf16", activation_checkpointing=ac).parallelize(model, mesh)
        objective = llmzoo.build_objective(cfg, model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, (B, T), device="cuda")}

        def step():
            loss = run_objective(model, objective, batch).value
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        torch.cuda.reset_peak_memory_stats()
        sec = cuda_time(step, iters=args.iters)
        key = "activation_checkpointing" if ac else "no_checkpointing"
        out[key] = {"tokens_per_s": B * T / sec, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(f"  fsdp {key}: {out[key]['tokens_per_s']:,.0f} tok/s, {out[key]['peak_mem_gib']:.1f} GiB", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()
    return {"batch": B, "seq_len": T, "world_size": 1, "mixed_precision": "bf16", "variants": out}


def decode_7b(args) -> dict:
    from llmzoo_plugins.sampling import Greedy
    from llmzoo_plugins.static_cache import StaticCache

    shape = ["model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8",
             "model.ffn_hidden=14336", "model.vocab_size=32000", "model.tie_embeddings=false",
             f"model.max_seq_len={args.decode_max_len}", "model.rope_theta=500000.0"]
    cfg = llmzoo.compose(overrides=["model=1b", "block=dense"] + shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = llmzoo.build_model(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    prompt = [[1 + (i * 37) % 31000 for i in range(args.prompt_len)]]
    n = args.new_tokens
    emb = model.embedding.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    blk = model.blocks[0].mixer
    kv_per_token = 2 * len(model.blocks) * blk.n_kv_heads * blk.head_dim * emb.element_size()
    mean_ctx = args.prompt_len + n / 2
    bytes_per_token = weight_bytes + kv_per_token * mean_ctx
    roofline = hbm_bandwidth() / bytes_per_token
    out = {}
    greedy = Greedy()
    with torch.no_grad():
        ref = greedy.generate(model, prompt, max_new_tokens=16)
        eager_s = cuda_time(lambda: greedy.generate(model, prompt, max_new_tokens=32), iters=2, warmup=0)
        out["eager_greedy"] = {"tokens_per_s": 32 / eager_s}
        static = StaticCache(mode="reduce-overhead")
        t0 = time.perf_counter()
        same = static.generate(model, prompt, max_new_tokens=16) == ref
        compile_s = time.perf_counter() - t0
        sec = cuda_time(lambda: static.generate(model, prompt, max_new_tokens=n), iters=3, warmup=1)
        out["static"] = {"tokens_per_s": n / sec, "first_call_s": compile_s, "same_as_greedy_16": same}
        # gpt-fast's setting: Inductor tunes each kernel's launch parameters by coordinate descent
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with inductor_config.patch(coordinate_descent_tuning=True):
            static = StaticCache(mode="reduce-overhead")
            t0 = time.perf_counter()
            same = static.generate(model, prompt, max_new_tokens=16) == ref
            compile_s = time.perf_counter() - t0
            sec = cuda_time(lambda: static.generate(model, prompt, max_new_tokens=n), iters=3, warmup=1)
        out["static_coordinate_descent"] = {"tokens_per_s": n / sec, "first_call_s": compile_s,
                                            "same_as_greedy_16": same}
    for v in out.values():
        v["pct_of_hbm_roofline"] = 100 * v["tokens_per_s"] / roofline
    print("  decode_7b: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s = {v['pct_of_hbm_roofline']:.0f}%"
                                      for k, v in out.items()) + f" of the roofline {roofline:.1f}", flush=True)
    params = model.num_parameters()
    del model
    torch.cuda.empty_cache()
    return {"params": params, "dtype": "bfloat16", "batch": 1, "prompt_len": args.prompt_len, "new_tokens": n,
            "static_max_len": args.decode_max_len, "weight_bytes": weight_bytes, "bytes_per_token": bytes_per_token,
            "hbm_bytes_per_s": hbm_bandwidth(), "roofline_tokens_per_s": roofline, "variants": out}


def _forward(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def _fwd_bwd(module, x):
    def run():
        x.grad = None
        module(x).float().square().mean().backward()
    return run


def moe(args) -> dict:
    from llmzoo_plugins.moe import MoE

    torch.manual_seed(0)
    kw = dict(n_experts=8, top_k=2, hidden=2816)
    ref = MoE(1024, backend="reference", **kw).cuda().to(torch.bfloat16)
    fast = MoE(1024, backend="torch", **kw).cuda().to(torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(8, 1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        diff = (fast(x).float() - ref(x).float()).abs().max().item()
    t_ref, t_fast = cuda_time(_fwd_bwd(ref, x), 10), cuda_time(_fwd_bwd(fast, x), 10)
    print(f"  moe: grouped {t_fast * 1e3:.2f} ms vs loop {t_ref * 1e3:.2f} ms = {t_ref / t_fast:.2f}x", flush=True)
    return {"dim": 1024, "tokens": 8 * 1024, **kw, "loop_ms": t_ref * 1e3, "grouped_ms": t_fast * 1e3,
            "speedup": t_ref / t_fast, "max_abs_diff": diff}


def mamba2(args) -> dict:
    from llmzoo_plugins.mamba import Mamba2Mixer, _fla_available, _fla_backward_ok

    if not _fla_available():
        return {"skipped": "fla-core is not installed"}
    torch.manual_seed(0)
    kw = dict(d_state=128, headdim=64, chunk_size=64)
    ref = Mamba2Mixer(1024, backend="torch", **kw).cuda()
    fast = Mamba2Mixer(1024, backend="triton", **kw).cuda()
    fast.load_state_dict(ref.state_dict())
    out = {}
    backward = _fla_backward_ok()
    for dtype in (torch.float32, torch.bfloat16):
        r, f = ref.to(dtype), fast.to(dtype)
        x = torch.randn(4, 2048, 1024, device="cuda", dtype=dtype, requires_grad=backward)
        with torch.no_grad():
            diff = (f(x).float() - r(x).float()).abs().max().item() / r(x).float().abs().max().item()
        for mode in ("forward", "forward+backward") if backward else ("forward",):
            timed = _forward if mode == "forward" else _fwd_bwd
            t_ref, t_fast = cuda_time(timed(r, x), 5), cuda_time(timed(f, x), 10)
            out[f"{str(dtype).split('.')[-1]} {mode}"] = {"torch_ms": t_ref * 1e3, "triton_ms": t_fast * 1e3,
                                                        "speedup": t_ref / t_fast, "max_rel_diff": diff}
            print(f"  mamba2 {dtype} {mode}: triton {t_fast * 1e3:.2f} ms vs torch {t_ref * 1e3:.2f} ms "
                  f"= {t_ref / t_fast:.1f}x (rel diff {diff:.1e})", flush=True)
    return {"shape": [4, 2048, 1024], **kw, "variants": out, "fla_backward_sound": backward,
            "note": None if backward else "fla refuses its gated backward with Triton < 3.7.1 on Hopper (fla #640): "
                                          "training uses the torch path, only forwards are timed"}


def kernels(args) -> dict:
    from llmzoo.layers import RMSNorm, SwiGLU
    from llmzoo_plugins.kernels import Liger, liger_available

    if not liger_available():
        return {"skipped": "liger-kernel is not installed"}
    x = torch.randn(8, 2048, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for name, make in {"rms_norm": lambda: RMSNorm(2048), "swiglu": lambda: SwiGLU(2048, 8192)}.items():
        ref = make().cuda().to(torch.bfloat16)
        fast = Liger().apply(make().cuda().to(torch.bfloat16))
        fast.load_state_dict(ref.state_dict())
        t_ref, t_fast = cuda_time(_fwd_bwd(ref, x), 10), cuda_time(_fwd_bwd(fast, x), 10)
        out[name] = {"reference_ms": t_ref * 1e3, "liger_ms": t_fast * 1e3, "speedup": t_ref / t_fast}
        print(f"  kernels {name}: liger {t_fast * 1e3:.2f} ms vs reference {t_ref * 1e3:.2f} ms", flush=True)
    return {"shape": [8, 2048, 2048], "dtype": "bfloat16", "variants": out}


def fused_ce(args) -> dict:
    from fused_ce import loss_step  # benchmarks/fused_ce.py

    shape = argparse.Namespace(device="cuda", dtype="bfloat16", tokens=16384, dim=4096, vocab=128256, chunk=1024,
                               iters=5)
    out = {}
    for variant in ("logits", "reference", "liger"):
        try:
            out[variant] = loss_step(variant, shape)
        except Exception as e:  # noqa: BLE001 - Liger missing: the other two still count
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
        torch.cuda.empty_cache()
        print(f"  fused_ce {variant}: {out[variant]}", flush=True)
    return {"shape": {k: v for k, v in vars(shape).items() if k != "device"}, "variants": out}


SECTIONS = {"kernels": kernels, "fused_ce": fused_ce, "mamba2": mamba2, "moe": moe, "train_1b": train_1b, "fsdp_ac": fsdp_ac,
            "decode_7b": decode_7b}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSONL file the records are appended to")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-max-len", type=int, default=1024)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    failed = 0
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            record = SECTIONS[name](args)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            record, failed = {"error": f"{type(e).__name__}: {e}"[:2000]}, failed + 1
        record = {"benchmark": "gpu", "section": name, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                  "commit": commit(), "device": device_description(), "torch": torch.__version__,
                  "seconds": round(time.perf_counter() - t0, 1), **record}
        with args.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
