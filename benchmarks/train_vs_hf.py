"""Training throughput: llmzoo (LanguageModel + clm objective through Lightning) against
the Hugging Face model of the same shape (Llama for dense, Mixtral for MoE, Mamba and
Mamba-2 for MLP-free Mamba blocks) and, for dense blocks, litgpt's GPT and torchtitan's
Llama 3 of the same shape (when installed: ``pip install --no-deps litgpt``, and see
``torchtitan_same_shape``) in a plain PyTorch loop, with the same batches,
optimizer and precision, in one process. Also times the llmzoo model in the same plain
loop, which isolates what Lightning and the plugin layers cost.

    python benchmarks/train_vs_hf.py                    # model=small dense, CPU, fp32
    python benchmarks/train_vs_hf.py 'bench.blocks=[dense,moe,mamba,mamba2]'   # every block, bench.shape_overrides
    python benchmarks/report.py                         # records -> markdown table

Each run appends one JSON record to ``bench.out``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import llmzoo
from llmzoo.shared.flops import device_description
from llmzoo.training import LMModule, compile_blocks


def batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g) for _ in range(n)]


def hf_same_shape(model: llmzoo.LanguageModel, cfg: DictConfig, attn: str):
    """The Hugging Face model of the same shape as ``model``: Llama for dense blocks,
    Mixtral for MoE, Mamba / Mamba-2 for MLP-free Mamba blocks (weights not copied:
    tests/test_hf_parity.py shows the two compute the same function)."""
    import transformers

    m, block = cfg.model, model.blocks[0]
    kind = type(block).__name__
    common = dict(vocab_size=model.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers,
                  tie_word_embeddings=m.tie_embeddings)
    if kind == "DenseBlock" or kind == "MoEBlock":
        attn_kw = dict(num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                       max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta)
        if kind == "DenseBlock":
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(
                intermediate_size=block.ffn.hidden, attention_bias=False, mlp_bias=False, attn_implementation=attn,
                **attn_kw, **common))
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=block.ffn.hidden, num_local_experts=block.ffn.n_experts,
            num_experts_per_tok=block.ffn.top_k, attn_implementation=attn, **attn_kw, **common))
    if block.ffn is not None:
        raise ValueError(f"{kind} with an MLP has no Hugging Face twin: benchmark it with block.mlp=false")
    mixer = block.mixer
    if kind == "MambaBlock":
        return transformers.MambaForCausalLM(transformers.MambaConfig(
            state_size=mixer.d_state, expand=mixer.d_inner // m.dim, conv_kernel=mixer.conv1d.kernel_size[0],
            layer_norm_epsilon=m.norm_eps, use_bias=False, use_conv_bias=True, **common))
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        state_size=mixer.d_state, expand=mixer.d_inner // m.dim, head_dim=mixer.headdim, num_heads=mixer.nheads,
        n_groups=mixer.ngroups, conv_kernel=mixer.conv1d.kernel_size[0], chunk_size=mixer.chunk_size,
        layer_norm_epsilon=m.norm_eps, use_bias=False, use_conv_bias=True, **common))


def litgpt_same_shape(model: llmzoo.LanguageModel, cfg: DictConfig):
    """litgpt's GPT (Llama layout: RMSNorm, grouped-query attention with RoPE, LLaMAMLP)
    of the same shape as a dense ``model``; None with the reason when it cannot be built.
    litgpt pins huggingface-hub and psutil below what llmzoo's extras bring, so it is
    installed without its dependencies: ``pip install --no-deps litgpt`` (the model
    module needs only torch and lightning)."""
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError as e:
        return None, f"litgpt is not installed ({e}); pip install --no-deps litgpt"
    block = model.blocks[0]
    if type(block).__name__ != "DenseBlock":
        return None, f"{type(block).__name__} has no litgpt twin"
    m = cfg.model
    c = Config(n_layer=m.n_layers, n_embd=m.dim, n_head=m.n_heads, n_query_groups=m.n_kv_heads,
               head_size=block.mixer.head_dim, intermediate_size=block.ffn.hidden, block_size=m.max_seq_len,
               vocab_size=model.vocab_size, padded_vocab_size=model.vocab_size, bias=False,
               mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", norm_eps=m.norm_eps, parallel_residual=False,
               rotary_percentage=1.0, rope_base=int(m.rope_theta))
    return GPT(c), None


def torchtitan_same_shape(model: llmzoo.LanguageModel, cfg: DictConfig):
    """torchtitan's Llama 3 (``Llama3Model``: fused QKV, complex RoPE, SwiGLU FFN) of the same
    shape as a dense ``model``, with SDPA causal attention (its language-model presets use
    flex attention over document masks, which CPU torch compiles only through Triton); None
    with the reason when it cannot be built. Installed without its dependencies, plus the
    few its model modules import: ``pip install --no-deps torchtitan spmd_types
    torch_checkpointing torchdata tyro docstring_parser einops triton`` (triton is only
    imported, the CPU never runs it)."""
    from functools import partial

    try:
        from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
        from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock
    except ImportError as e:
        return None, (f"torchtitan is not installed or does not import ({e}); pip install --no-deps torchtitan "
                      "spmd_types torch_checkpointing torchdata tyro docstring_parser einops triton")
    block = model.blocks[0]
    if type(block).__name__ != "DenseBlock":
        return None, f"{type(block).__name__} has no torchtitan twin here"
    m, dim, vocab = cfg.model, cfg.model.dim, model.vocab_size
    init = {"weight": partial(torch.nn.init.normal_, std=m.init_std), "bias": torch.nn.init.zeros_}
    rope = ComplexRoPE.Config(dim=block.mixer.head_dim, max_seq_len=m.max_seq_len, theta=m.rope_theta)
    layers = [Llama3TransformerBlock.Config(
        attention_norm=RMSNorm.Config(normalized_shape=dim, eps=m.norm_eps),
        ffn_norm=RMSNorm.Config(normalized_shape=dim, eps=m.norm_eps),
        attention=make_gqa_config(dim=dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, wqkv_param_init=init,
                                  wo_param_init=init, inner_attention=ScaledDotProductAttention.Config(),
                                  fuse_qkv=True, rope=rope),
        feed_forward=make_ffn_config(dim=dim, hidden_dim=block.ffn.hidden, w1_param_init=init, w2w3_param_init=init))
        for _ in range(m.n_layers)]
    titan = Llama3Model.Config(dim=dim, vocab_size=vocab, layers=layers,
                               tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
                               norm=RMSNorm.Config(normalized_shape=dim, eps=m.norm_eps),
                               lm_head=Linear.Config(in_features=dim, out_features=vocab)).build()
    titan.init_states()
    return titan, None


# Peers timed in the plain loop beside Hugging Face (dense blocks): name -> builder
# returning (model whose forward(ids) gives logits, or None, and why not).
PEERS = {"litgpt": litgpt_same_shape, "torchtitan": torchtitan_same_shape}


def adamw(params, o):
    """The optimizer of every plain loop: torch's fused AdamW, as llmzoo's trainer uses (and
    transformers' Trainer by default), so that the ratios compare the models."""
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=True)


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


def build_ours(cfg: DictConfig) -> llmzoo.LanguageModel:
    torch.manual_seed(0)
    model = llmzoo.build_model(cfg)
    return compile_blocks(model) if cfg.trainer.get("compile") else model


def time_lightning(cfg: DictConfig, data, warmup: int) -> float:
    model = build_ours(cfg)
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


def compare(cfg: DictConfig, b: DictConfig) -> dict:
    """Time llmzoo (Lightning), llmzoo (plain loop) and the HF twin on the same batches."""
    import transformers

    from llmzoo_plugins.clm import next_token_loss

    torch.manual_seed(0)
    ours = llmzoo.build_model(cfg)
    hf = hf_same_shape(ours, cfg, b.attn_implementation)
    data = batches(b.warmup + b.steps, b.batch_size, b.seq_len, ours.vocab_size)
    tokens = b.steps * b.batch_size * b.seq_len

    def ours_loss(m, ids):
        return next_token_loss(m(ids).logits, ids)[0]

    def hf_loss(m, ids):
        return next_token_loss(m(input_ids=ids).logits, ids)[0]

    times = {"llmzoo_lightning": [], "llmzoo_plain_loop": [], "hf_plain_loop": []}
    peers = {name: build(ours, cfg) for name, build in PEERS.items()}
    for name, (peer, _) in peers.items():
        if peer is not None:
            times[f"{name}_plain_loop"] = []

    def peer_loss(m, ids):
        return next_token_loss(m(ids), ids)[0]

    for r in range(b.repeats):  # alternate so that machine noise hits every contender alike
        times["llmzoo_lightning"].append(time_lightning(cfg, data, b.warmup))
        m = build_ours(cfg)
        times["llmzoo_plain_loop"].append(time_plain_loop(plain_step(m, adamw(m.parameters(), cfg.optim), ours_loss),
                                                          data, b.warmup))
        torch.manual_seed(0)
        h = hf_same_shape(ours, cfg, b.attn_implementation)
        times["hf_plain_loop"].append(time_plain_loop(plain_step(h, adamw(h.parameters(), cfg.optim), hf_loss),
                                                      data, b.warmup))
        for name, (peer, _) in peers.items():
            if peer is not None:
                torch.manual_seed(0)
                g, _ = PEERS[name](ours, cfg)
                times[f"{name}_plain_loop"].append(time_plain_loop(
                    plain_step(g, adamw(g.parameters(), cfg.optim), peer_loss), data, b.warmup))
        print(f"{type(ours.blocks[0]).__name__} repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    return {
        "block": cfg.block._target_, "hf_class": type(hf).__name__, "transformers": transformers.__version__,
        "compile": bool(cfg.trainer.get("compile")),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "params": {"llmzoo": ours.num_parameters(), "hf": sum(p.numel() for p in hf.parameters())},
        "tokens_per_s": tps,
        "ratio_llmzoo_lightning_vs_hf": tps["llmzoo_lightning"] / tps["hf_plain_loop"],
        "ratio_llmzoo_plain_vs_hf": tps["llmzoo_plain_loop"] / tps["hf_plain_loop"],
        "lightning_overhead": 1 - tps["llmzoo_lightning"] / tps["llmzoo_plain_loop"],
        **{k: v for name, (peer, missing) in peers.items() for k, v in (
            {f"params_{name}": sum(p.numel() for p in peer.parameters()),
             f"ratio_llmzoo_lightning_vs_{name}": tps["llmzoo_lightning"] / tps[f"{name}_plain_loop"],
             f"ratio_llmzoo_plain_vs_{name}": tps["llmzoo_plain_loop"] / tps[f"{name}_plain_loop"]}
            if peer is not None else {name: missing}).items()},
    }


@hydra.main(config_path="pkg://llmzoo_conf", config_name="bench_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    runs = [cfg] if not b.get("blocks") else [
        llmzoo.compose("bench_train", [f"block={name}", *b.block_overrides.get(name, []), *b.shape_overrides],
                       validate=True) for name in b.blocks]
    for run_cfg in runs:
        result = compare(run_cfg, b)
        record = {"benchmark": "train_vs_hf", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit(),
                  "device": device_description(),
                  "torch": torch.__version__, "batch_size": b.batch_size, "seq_len": b.seq_len, "steps": b.steps,
                  "repeats": b.repeats, "precision": cfg.trainer.precision, **result}
        out = Path(hydra.utils.to_absolute_path(b.out))
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("block", "hf_class", "params", "tokens_per_s",
                                                 "ratio_llmzoo_lightning_vs_hf", "ratio_llmzoo_plain_vs_hf")}, indent=1))


if __name__ == "__main__":
    main()
