"""Training throughput: llmzoo (LanguageModel + clm objective through Lightning) against
Hugging Face ``LlamaForCausalLM`` of the same shape in a plain PyTorch loop, with the
same batches, optimizer and precision, in one process. Also times the llmzoo model in
the same plain loop, which isolates what Lightning and the plugin layers cost.

    python benchmarks/train_vs_hf.py                    # model=small, CPU, fp32
    python benchmarks/train_vs_hf.py model=tiny bench.steps=5
    python benchmarks/report.py                         # records -> markdown table

Each run appends one JSON record to ``bench.out``.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import llmzoo
from llmzoo.training import LMModule


def batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g) for _ in range(n)]


def hf_llama_like(model: llmzoo.LanguageModel, cfg: DictConfig, attn: str):
    import transformers

    m = cfg.model
    block = model.blocks[0]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=m.dim, intermediate_size=block.ffn.hidden,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, attn_implementation=attn)
    return transformers.LlamaForCausalLM(hf_cfg)


def adamw(params, o):
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def time_plain_loop(step_fn, data, warmup: int) -> float:
    """Seconds for the timed steps of a plain loop (after ``warmup`` untimed ones)."""
    for b in data[:warmup]:
        step_fn(b)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        step_fn(b)
    return time.perf_counter() - t0


def plain_step(model, opt, loss_of):
    def step(ids):
        loss = loss_of(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.seconds = warmup, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def time_lightning(cfg: DictConfig, data, warmup: int) -> float:
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg)
    module = LMModule(model, llmzoo.build_objective(cfg), OmegaConf.to_container(cfg.optim, resolve=True),
                      len(data))
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=len(data), accelerator="cpu", devices=1, precision=cfg.trainer.precision,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in data], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


@hydra.main(config_path="pkg://llmzoo_conf", config_name="bench_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import transformers

    from llmzoo_plugins.clm import next_token_loss

    b = cfg.bench
    torch.manual_seed(0)
    ours = llmzoo.build_model(cfg)
    hf = hf_llama_like(ours, cfg, b.attn_implementation)
    data = batches(b.warmup + b.steps, b.batch_size, b.seq_len, ours.vocab_size)
    tokens = b.steps * b.batch_size * b.seq_len

    def ours_loss(m, ids):
        return next_token_loss(m(ids).logits, ids)[0]

    def hf_loss(m, ids):
        return next_token_loss(m(input_ids=ids).logits, ids)[0]

    times = {"llmzoo_lightning": [], "llmzoo_plain_loop": [], "hf_llama_plain_loop": []}
    for r in range(b.repeats):  # alternate so that machine noise hits every contender alike
        times["llmzoo_lightning"].append(time_lightning(cfg, data, b.warmup))
        torch.manual_seed(0)
        m = llmzoo.build_model(cfg)
        times["llmzoo_plain_loop"].append(time_plain_loop(plain_step(m, adamw(m.parameters(), cfg.optim), ours_loss),
                                                          data, b.warmup))
        torch.manual_seed(0)
        h = hf_llama_like(ours, cfg, b.attn_implementation)
        times["hf_llama_plain_loop"].append(time_plain_loop(plain_step(h, adamw(h.parameters(), cfg.optim), hf_loss),
                                                            data, b.warmup))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    record = {
        "benchmark": "train_vs_hf", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit(),
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": OmegaConf.to_container(cfg.model, resolve=True), "block": cfg.block._target_,
        "params": {"llmzoo": ours.num_parameters(), "hf": sum(p.numel() for p in hf.parameters())},
        "batch_size": b.batch_size, "seq_len": b.seq_len, "steps": b.steps, "repeats": b.repeats,
        "precision": cfg.trainer.precision, "tokens_per_s": tps,
        "ratio_llmzoo_lightning_vs_hf": tps["llmzoo_lightning"] / tps["hf_llama_plain_loop"],
        "ratio_llmzoo_plain_vs_hf": tps["llmzoo_plain_loop"] / tps["hf_llama_plain_loop"],
        "lightning_overhead": 1 - tps["llmzoo_lightning"] / tps["llmzoo_plain_loop"],
    }
    out = Path(hydra.utils.to_absolute_path(b.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("params", "tokens_per_s", "ratio_llmzoo_lightning_vs_hf",
                                             "ratio_llmzoo_plain_vs_hf", "lightning_overhead")}, indent=2))


if __name__ == "__main__":
    main()
