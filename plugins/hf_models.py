"""Hugging Face ``transformers`` model families <-> llmzoo blocks (``llmzoo import-hf``,
``init_from=hf:``, ``llmzoo export-hf``; the folders themselves are read and written by
``llmzoo_plugins.hf_io``).

  llama, mistral, qwen2, qwen3  <->  block=dense  (DenseBlock: biases, q/k norm, head_dim,
                                                  RoPE scaling, sliding window)
  mixtral                       <->  block=moe    (MoEBlock over Attention, softmax_norm routing)
  mamba                         <->  block=mamba  with mlp=false
  mamba2                        <->  block=mamba2 with mlp=false

Each family is one small class: which config.json fields mean what, and a table from
our state-dict names to theirs. Whatever a family cannot represent is refused with
``HFUnsupported`` naming the field, never approximated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

import llmzoo
from llmzoo.interfaces import HFUnsupported

DENSE = "llmzoo_plugins.attention.DenseBlock"
ATTENTION = "llmzoo_plugins.attention.Attention"
MOE = "llmzoo_plugins.moe.MoEBlock"
MAMBA = "llmzoo_plugins.mamba.MambaBlock"
MAMBA2 = "llmzoo_plugins.mamba.Mamba2Block"
MAX_SEQ_LEN = 4096  # imported models get at most this context unless asked (RoPE tables are per layer)


def _need(hf: dict, key: str, allowed: Callable[[Any], bool], why: str) -> None:
    if key in hf and not allowed(hf[key]):
        raise HFUnsupported(f"config.json {key}={hf[key]!r}: {why}")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    params.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in params})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise HFUnsupported(f"config.json rope_scaling.rope_type={kind!r}: llmzoo implements default, linear, "
                            "llama3 and yarn")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFUnsupported("config.json partial_rotary_factor: rotary embeddings on part of a head are not built")
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, **{k: v for k, v in params.items() if k not in ("rope_type", "type")}}
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, scaling


def _model_node(hf: dict, max_seq_len: int | None, norm_eps: float) -> dict:
    return {"dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
            "n_heads": hf.get("num_attention_heads", 1), "n_kv_heads": hf.get("num_key_value_heads"),
            "max_seq_len": min(hf.get("max_position_embeddings") or MAX_SEQ_LEN, max_seq_len or MAX_SEQ_LEN),
            "ffn_hidden": hf.get("intermediate_size"), "vocab_size": hf["vocab_size"], "pad_vocab_to": None,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": norm_eps,
            "init_std": hf.get("initializer_range", 0.02), "rope_theta": _rope(hf)[0]}


def _common_in(prefix: str, emb: str, norm: str) -> dict[str, str]:
    return {"embedding.weight": f"{prefix}.{emb}.weight", "norm.weight": f"{prefix}.{norm}.weight",
            "head.weight": "lm_head.weight"}


def _head(hf: dict, read: Callable[[str], torch.Tensor], emb: str) -> torch.Tensor:
    """The output head; a tied model stores only the embedding."""
    if hf.get("tie_word_embeddings"):
        return read(emb)
    return read("lm_head.weight")


# ----------------------------------------------------------------------------- attention families
class LlamaFamily:
    """Llama, Mistral, Qwen2 and Qwen3: pre-norm GQA attention with RoPE and a SwiGLU MLP."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def attention_node(self, hf: dict, max_seq_len: int) -> dict:
        _need(hf, "hidden_act", lambda v: v == "silu", "llmzoo's MLP is SwiGLU (silu)")
        _need(hf, "mlp_bias", lambda v: not v, "biases in the MLP are not built")
        mt = hf.get("model_type")
        if hf.get("use_sliding_window") and mt in ("qwen2", "qwen3"):
            raise HFUnsupported("config.json use_sliding_window=true: Qwen's per-layer mix of sliding and full "
                                "attention (max_window_layers) is not built")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        theta, scaling = _rope(hf)
        bias = bool(hf.get("attention_bias", False))
        return {"dim": hf["hidden_size"], "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
                "max_seq_len": max_seq_len, "rope_theta": theta, "backend": "auto",
                "head_dim": None if head_dim * heads == hf["hidden_size"] else head_dim,
                "qkv_bias": True if mt == "qwen2" else bias, "out_bias": False if mt == "qwen2" else bias,
                "qk_norm": mt == "qwen3", "rope_scaling": scaling,
                "sliding_window": hf.get("sliding_window") if mt == "mistral" else None}

    def import_config(self, hf: dict, max_seq_len: int | None = None) -> dict:
        model = _model_node(hf, max_seq_len, hf.get("rms_norm_eps", 1e-6))
        attn = self.attention_node(hf, model["max_seq_len"])
        attn.pop("dim")
        block = {"_target_": DENSE, "dim": model["dim"], "ffn_hidden": hf["intermediate_size"],
                 "norm_eps": model["norm_eps"], **{k: v for k, v in attn.items() if k != "norm_eps"}}
        return {"model": model, "block": block}

    @staticmethod
    def attention_names(i: int, hf_prefix: str = "model") -> dict[str, str]:
        p, q = f"blocks.{i}.", f"{hf_prefix}.layers.{i}."
        names = {"mixer_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "o_proj")):
            names[f"mixer.{ours}.weight"] = f"self_attn.{theirs}.weight"
            names[f"mixer.{ours}.bias"] = f"self_attn.{theirs}.bias"
        names.update({"mixer.q_norm.weight": "self_attn.q_norm.weight", "mixer.k_norm.weight": "self_attn.k_norm.weight"})
        return {p + a: q + b for a, b in names.items()}

    def names(self, n_layers: int) -> dict[str, str]:
        """Our name -> theirs, for every tensor either side may have."""
        names = _common_in("model", "embed_tokens", "norm")
        for i in range(n_layers):
            names.update(self.attention_names(i))
            names.update({f"blocks.{i}.ffn.{a}.weight": f"model.layers.{i}.mlp.{a}_proj.weight"
                          for a in ("gate", "up", "down")})
        return names

    def import_weights(self, hf: dict, read: Callable[[str], torch.Tensor], n_layers: int,
                       wanted: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        names = self.names(n_layers)
        for ours in wanted:
            if ours == "head.weight":
                yield ours, _head(hf, read, names["embedding.weight"])
            elif ours in names:
                yield ours, read(names[ours])

    # export
    def exports(self, cfg: Any) -> bool:
        return cfg.block._target_ == DENSE

    def hf_model_type(self, node: Any) -> str:
        if node.get("qk_norm"):
            if node.get("qkv_bias") or node.get("out_bias") or node.get("sliding_window"):
                raise HFUnsupported("block: qk_norm with biases or a sliding window has no transformers family")
            return "qwen3"
        if node.get("qkv_bias") and not node.get("out_bias"):
            if node.get("sliding_window"):
                raise HFUnsupported("block: q/k/v biases with a sliding window has no transformers family")
            return "qwen2"
        if node.get("qkv_bias") != node.get("out_bias"):
            raise HFUnsupported("block: a bias on the output projection alone has no transformers family")
        return "mistral" if node.get("sliding_window") else "llama"

    def attention_config(self, node: Any, attn: torch.nn.Module) -> dict:
        out = {"num_attention_heads": attn.n_heads, "num_key_value_heads": attn.n_kv_heads,
               "head_dim": attn.head_dim, "rope_theta": float(attn.rope_theta),
               "max_position_embeddings": attn.max_seq_len}
        if attn.rope_scaling:
            out["rope_scaling"] = dict(attn.rope_scaling)
        if attn.sliding_window:
            out["sliding_window"] = attn.sliding_window
        return out

    def export_config(self, cfg: Any, model: torch.nn.Module) -> dict:
        mt = self.hf_model_type(cfg.block)
        b = model.blocks[0]
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[mt]
        extra = {"attention_bias": bool(cfg.block.get("qkv_bias")), "mlp_bias": False} if mt in ("llama", "qwen3") \
            else {}
        return {"architectures": [arch], "model_type": mt, **_common_out(cfg, model),
                "intermediate_size": b.ffn.hidden, "hidden_act": "silu", "rms_norm_eps": b.mixer_norm.eps,
                **self.attention_config(cfg.block, b.mixer), **extra}

    def export_weights(self, cfg: Any, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        names = self.names(len(_layers(state)))
        for ours, t in state.items():
            if ours == "head.weight" and cfg.model.get("tie_embeddings"):
                continue
            yield names[ours], t


# ----------------------------------------------------------------------------- Mixtral
class MixtralFamily(LlamaFamily):
    """Mixtral: Llama attention, then a top-k softmax-renormalised mixture of SwiGLU experts.
    Reads both expert layouts (one tensor per expert and matrix, as Mixtral checkpoints are
    saved, or transformers 5's fused (E, 2H, D) ``gate_up_proj``); writes the first."""

    model_types = ("mixtral",)

    def import_config(self, hf: dict, max_seq_len: int | None = None) -> dict:
        model = _model_node(hf, max_seq_len, hf.get("rms_norm_eps", 1e-5))
        attn = {"_target_": ATTENTION, **self.attention_node(hf, model["max_seq_len"]),
                "norm_eps": model["norm_eps"]}
        block = {"_target_": MOE, "_recursive_": False, "dim": model["dim"], "mixer": attn,
                 "n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                 "hidden": hf["intermediate_size"], "n_shared": 0, "gating": "softmax_norm",
                 "capacity_factor": None, "balance_loss_weight": hf.get("router_aux_loss_coef", 0.01),
                 "z_loss_weight": 0.0, "backend": "auto", "norm_eps": model["norm_eps"]}
        return {"model": model, "block": block}

    def names(self, n_layers: int) -> dict[str, str]:
        names = _common_in("model", "embed_tokens", "norm")
        for i in range(n_layers):
            names.update(self.attention_names(i))
        return names

    def import_weights(self, hf, read, n_layers, wanted):
        names = self.names(n_layers)
        for ours in wanted:
            i, _, rest = ours.removeprefix("blocks.").partition(".")
            if rest == "ffn.router.weight":
                yield ours, read(_first(read, f"model.layers.{i}.block_sparse_moe.gate.weight",
                                        f"model.layers.{i}.mlp.gate.weight"))
            elif rest in ("ffn.w_gate_up", "ffn.w_down"):
                yield ours, self.experts(read, int(i), hf["num_local_experts"], rest == "ffn.w_gate_up")
            elif ours == "head.weight":
                yield ours, _head(hf, read, names["embedding.weight"])
            elif ours in names:
                yield ours, read(names[ours])

    @staticmethod
    def experts(read, i: int, n: int, gate_up: bool) -> torch.Tensor:
        """Ours: w_gate_up (E, D, 2H) with gate first, w_down (E, H, D)."""
        fused = f"model.layers.{i}.mlp.experts.{'gate_up_proj' if gate_up else 'down_proj'}"
        if read.has(fused):
            return read(fused).transpose(1, 2)
        p = f"model.layers.{i}.block_sparse_moe.experts."
        if gate_up:  # w1 gate, w3 up: (H, D) each
            return torch.stack([torch.cat([read(f"{p}{e}.w1.weight"), read(f"{p}{e}.w3.weight")]).T for e in range(n)])
        return torch.stack([read(f"{p}{e}.w2.weight").T for e in range(n)])  # w2: (D, H)

    def exports(self, cfg: Any) -> bool:
        return cfg.block._target_ == MOE

    def export_config(self, cfg: Any, model: torch.nn.Module) -> dict:
        node, b = cfg.block, model.blocks[0]
        if node.mixer._target_ != ATTENTION:
            raise HFUnsupported(f"block.mixer={node.mixer._target_}: Mixtral's mixer is attention")
        if node.get("n_shared"):
            raise HFUnsupported("block.n_shared: shared experts have no Mixtral counterpart")
        if node.get("gating") != "softmax_norm":
            raise HFUnsupported(f"block.gating={node.get('gating')}: Mixtral routes with softmax_norm")
        if self.hf_model_type(node.mixer) not in ("llama", "mistral"):
            raise HFUnsupported("block.mixer: q/k norm or q/k/v biases have no Mixtral counterpart")
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_common_out(cfg, model),
                "intermediate_size": b.ffn.hidden, "hidden_act": "silu", "rms_norm_eps": b.mixer_norm.eps,
                "num_local_experts": b.ffn.n_experts, "num_experts_per_tok": b.ffn.top_k,
                "router_aux_loss_coef": float(node.get("balance_loss_weight", 0.01)),
                **self.attention_config(node.mixer, b.mixer)}

    def export_weights(self, cfg, state):
        names = self.names(len(_layers(state)))
        for ours, t in state.items():
            i, _, rest = ours.removeprefix("blocks.").partition(".")
            p = f"model.layers.{i}.block_sparse_moe."
            if rest == "ffn.router.weight":
                yield p + "gate.weight", t
            elif rest == "ffn.w_gate_up":
                gate, up = t.chunk(2, dim=-1)  # (E, D, H) each
                for e in range(t.shape[0]):
                    yield f"{p}experts.{e}.w1.weight", gate[e].T.contiguous()
                    yield f"{p}experts.{e}.w3.weight", up[e].T.contiguous()
            elif rest == "ffn.w_down":
                for e in range(t.shape[0]):
                    yield f"{p}experts.{e}.w2.weight", t[e].T.contiguous()
            elif not (ours == "head.weight" and cfg.model.get("tie_embeddings")):
                yield names[ours], t


# ----------------------------------------------------------------------------- Mamba
class MambaFamily:
    """Mamba and Mamba-2 without an MLP: RMSNorm, then the mixer, whose parameter names are
    the same on both sides."""

    model_types = ("mamba", "mamba2")

    def import_config(self, hf: dict, max_seq_len: int | None = None) -> dict:
        _need(hf, "use_bias", lambda v: not v, "llmzoo's Mamba projections have no bias")
        _need(hf, "use_conv_bias", bool, "llmzoo's Mamba convolution always has a bias")
        _need(hf, "hidden_act", lambda v: v == "silu", "Mamba's activation is silu")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        model = {"dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": 1, "n_kv_heads": 1,
                 "max_seq_len": max_seq_len or MAX_SEQ_LEN, "ffn_hidden": None, "vocab_size": hf["vocab_size"],
                 "pad_vocab_to": None, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
                 "norm_eps": eps, "init_std": hf.get("initializer_range", 0.02), "rope_theta": 10000.0}
        block = {"dim": hf["hidden_size"], "d_state": hf["state_size"], "d_conv": hf.get("conv_kernel", 4),
                 "expand": hf.get("expand", 2), "mlp": False, "ffn_hidden": None, "norm_eps": eps, "backend": "auto"}
        if hf["model_type"] == "mamba":
            rank = hf.get("time_step_rank", "auto")
            block.update(_target_=MAMBA, dt_rank=math.ceil(hf["hidden_size"] / 16) if rank == "auto" else rank)
        else:
            inner = hf.get("expand", 2) * hf["hidden_size"]
            if hf["num_heads"] * hf["head_dim"] != inner:
                raise HFUnsupported(f"config.json num_heads * head_dim = {hf['num_heads'] * hf['head_dim']} differs "
                                    f"from expand * hidden_size = {inner}")
            limit = hf.get("time_step_limit") or [0.0, float("inf")]
            if limit[0] != 0.0 or not (isinstance(limit[1], dict) or limit[1] == float("inf")):
                raise HFUnsupported(f"config.json time_step_limit={limit}: a clamped time step is not built")
            if eps != 1e-5:
                raise HFUnsupported(f"config.json layer_norm_epsilon={eps}: llmzoo's Mamba-2 gated norm uses 1e-5")
            block.update(_target_=MAMBA2, headdim=hf["head_dim"], ngroups=hf.get("n_groups", 1),
                         chunk_size=hf.get("chunk_size", 256))
        return {"model": model, "block": block}

    @staticmethod
    def names(state_names: Iterable[str]) -> dict[str, str]:
        names = _common_in("backbone", "embeddings", "norm_f")
        for ours in state_names:
            if ours.startswith("blocks."):
                i, _, rest = ours.removeprefix("blocks.").partition(".")
                names[ours] = f"backbone.layers.{i}." + ("norm.weight" if rest == "mixer_norm.weight" else rest)
        return names

    def import_weights(self, hf, read, n_layers, wanted):
        wanted = list(wanted)
        names = self.names(wanted)
        for ours in wanted:
            yield ours, _head(hf, read, names["embedding.weight"]) if ours == "head.weight" else read(names[ours])

    def exports(self, cfg: Any) -> bool:
        return cfg.block._target_ in (MAMBA, MAMBA2)

    def export_config(self, cfg: Any, model: torch.nn.Module) -> dict:
        node, m = cfg.block, model.blocks[0].mixer
        if node.get("mlp", True):
            raise HFUnsupported("block.mlp=true: transformers' Mamba blocks have no MLP (export runs trained with "
                                "block.mlp=false)")
        common = {**_common_out(cfg, model), "state_size": m.d_state, "conv_kernel": m.conv1d.kernel_size[0],
                  "expand": m.d_inner // model.dim, "layer_norm_epsilon": model.blocks[0].mixer_norm.eps,
                  "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True}
        if node._target_ == MAMBA:
            return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
                    "intermediate_size": m.d_inner, "time_step_rank": m.dt_rank}
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **common, "num_heads": m.nheads,
                "head_dim": m.headdim, "n_groups": m.ngroups, "chunk_size": m.chunk_size}

    def export_weights(self, cfg, state):
        names = self.names(state)
        for ours, t in state.items():
            if not (ours == "head.weight" and cfg.model.get("tie_embeddings")):
                yield names[ours], t


# ----------------------------------------------------------------------------- helpers
def hf_state_dict(model: torch.nn.Module, tie_embeddings: bool = False, family: Any = None) -> dict:
    """A dense (default) or other ``LanguageModel``'s weights under ``transformers``' names,
    for loading into a model built in Python (tests, benchmarks)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"tie_embeddings": tie_embeddings}})
    return {k: v.detach().clone() for k, v in (family or LlamaFamily()).export_weights(cfg, model.state_dict())}

def _common_out(cfg: Any, model: torch.nn.Module) -> dict:
    return {"vocab_size": model.vocab_size, "hidden_size": model.dim, "num_hidden_layers": len(model.blocks),
            "tie_word_embeddings": bool(cfg.model.get("tie_embeddings")), "initializer_range": model.init_std,
            "torch_dtype": "float32"}


def _layers(state: dict) -> set[str]:
    return {k.split(".")[1] for k in state if k.startswith("blocks.")}


def _first(read, *names: str) -> str:
    for n in names:
        if read.has(n):
            return n
    raise HFUnsupported(f"none of {list(names)} is in the checkpoint")


@llmzoo.hookimpl
def llmzoo_hf_architectures() -> list:
    return [LlamaFamily(), MixtralFamily(), MambaFamily()]
