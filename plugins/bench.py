"""``llmzoo-bench``: measure any configured combination with one record schema.

    llmzoo-bench bench.kind=train  block=moe model=small      # tokens/s, step time, MFU, memory, val loss
    llmzoo-bench bench.kind=decode decoder=static              # tokens/s, ms/token, accepted per step
    llmzoo-bench bench.kind=memory model=125m                  # bytes of weights, grads, optimizer state, peak
    llmzoo-bench -m bench.kind=train block=dense,moe,mamba model=tiny,small   # a sweep; then llmzoo-report <dir>

Every run appends one JSON record (resolved config, device, library versions, git
commit, figures) to ``bench.out`` and, in a sweep, writes the job's result.json so the
sweep's summary.json and ``llmzoo-report`` work as for training sweeps.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from llmzoo.shared.flops import device_description
from llmzoo.cli import CONF, hydra_entry, run_job
from llmzoo.config import validate_config
from llmzoo.errors import UserError

KINDS = ("train", "decode", "memory")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llmzoo", "torch", "lightning", "hydra-core", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    """The commit of the llmzoo checkout (if installed from one), else of the working directory."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where)
        except OSError:
            break
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def bench_train(cfg: DictConfig) -> dict[str, Any]:
    from llmzoo.training import train

    summary = train(cfg)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches
    tps = summary.get("tokens_per_s")
    return {"tokens_per_s": tps, "step_ms": 1000 * tokens_per_step / tps if tps else None,
            "mfu": summary.get("mfu"), "val_loss": summary.get("val_loss"), "train_loss": summary.get("train_loss"),
            "parameters": summary["parameters"], "flops_per_token": summary.get("flops_per_token"),
            "peak_memory_mb": peak_memory_mb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}


def _model(cfg: DictConfig, b: DictConfig):
    from llmzoo.api import build_model, load_run

    if b.get("run_dir"):
        return load_run(b.run_dir)
    from llmzoo.api import Run, build_tokenizer

    return Run(build_model(cfg), build_tokenizer(cfg), cfg)


@torch.no_grad()
def bench_decode(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    from llmzoo.api import build_decoder, ready_decoder

    run = _model(cfg, b)
    device = torch.device(b.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = run.model.to(device).eval()
    decoder = ready_decoder(run._replace(model=model), build_decoder(cfg))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.vocab_size, (b.prompt_len,), generator=g).tolist() for _ in range(b.batch_size)]
    decoder.generate(model, prompts, max_new_tokens=b.new_tokens)  # warm-up (compiles where it does)
    times = []
    for _ in range(b.repeats):
        t0 = time.perf_counter()
        outs = decoder.generate(model, prompts, max_new_tokens=b.new_tokens)
        times.append(time.perf_counter() - t0)
    t, n = statistics.median(times), sum(len(o) for o in outs)
    stats = getattr(decoder, "stats", {})
    return {"tokens_per_s": n / t, "ms_per_token": 1000 * t / (n / len(prompts)), "batch_size": len(prompts),
            "new_tokens": b.new_tokens, "prompt_len": b.prompt_len, "parameters": model.num_parameters(),
            **{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}}  # e.g. accepted_per_step


def bench_memory(cfg: DictConfig, b: DictConfig) -> dict[str, Any]:
    """One AdamW training step on a random batch: the bytes each kind of state takes."""
    from llmzoo.api import build_objective
    from llmzoo.losses import run_objective
    from llmzoo.training import param_groups

    run = _model(cfg, b)
    device = torch.device(b.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = run.model.to(device).train()
    objective = build_objective(cfg, model, run.tokenizer)
    before = peak_memory_mb(device)
    ids = torch.randint(0, model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len), device=device)
    opt = torch.optim.AdamW(param_groups([model], 0.0), lr=1e-4)
    loss = run_objective(model, objective, {"input_ids": ids}).value
    loss.backward()
    opt.step()
    mb = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    return {"weights_mb": mb(model.parameters()),
            "grads_mb": mb(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer_mb": mb(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
            "peak_memory_mb": peak_memory_mb(device), "peak_before_mb": before,
            "batch": [cfg.data.batch_size, cfg.data.seq_len], "parameters": model.num_parameters()}


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    b = cfg.bench
    if b.kind not in KINDS:
        raise UserError(f"bench.kind={b.kind!r} is not one of {list(KINDS)}")
    if b.kind != "train":  # llmzoo.train validates the config of a training benchmark
        validate_config(cfg)
    figures = bench_train(cfg) if b.kind == "train" else bench_decode(cfg, b) if b.kind == "decode" \
        else bench_memory(cfg, b)
    record = {"benchmark": "llmzoo-bench", "kind": b.kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "commit": git_commit(), "device": device_description(), "versions": versions(),
              "config": OmegaConf.to_container(cfg, resolve=True), **figures}
    out = Path(b.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("config", "versions")}, default=str),
          file=sys.stderr)
    return record


@hydra.main(config_path=CONF, config_name="bench", version_base="1.3")
def _app(cfg: DictConfig) -> dict[str, Any] | float:
    return run_job(cfg, run_bench, "llmzoo-bench")


def main() -> None:
    """llmzoo-bench bench.kind=train|decode|memory [overrides...] (``--help`` for examples)."""
    hydra_entry("llmzoo-bench", _app)
