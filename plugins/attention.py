"""Dense transformer block: pre-norm RMSNorm, grouped-query causal self-attention
with rotary embeddings, SwiGLU MLP, and a KV cache for decoding (``block=dense``).

Attention backends (``backend:``):
  reference  explicit softmax(QK^T / sqrt(d)) V in float32 -- the ground truth
  sdpa       torch.nn.functional.scaled_dot_product_attention
  flash      flash-attn's kernels (CUDA, fp16/bf16, flash-attn installed)
  flex       torch's compiled flex_attention (packed rows: a block-causal block mask; CUDA
             for training, its backward does not run on CPU)
  auto       flash when it can run on the input, else sdpa; for packed rows sdpa with the
             dense document mask (flex and flash's varlen path are chosen by name: neither has
             been run on a GPU yet)
Packed rows (``segments``, data.packing=document): attention stays inside each document and
the rotary positions restart with it; flash takes its varlen path, flex a block mask built
once per batch, reference and sdpa a dense (B, 1, T, T) mask (the reference).
Separate q, k, v and out projections, named and laid out as Llama's (q_proj, ...), so
Hugging Face ``LlamaForCausalLM`` weights map one to one (``llmzoo_plugins.hf_models``,
``llmzoo import-hf`` / ``export-hf``) and tensor parallelism splits q, k and v column-wise by
heads and out row-wise (``tensor_parallel_plan``); the forward works unchanged on the
local heads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.decoding import take_rows
from llmzoo.interfaces import (KV_CACHE, PACKED, ROW_STATE, STATEFUL, STATIC_STATE, TENSOR_PARALLEL, TREE_MASK,
                               Segments)
from llmzoo.layers import ResidualBlock, RMSNorm, SwiGLU, swiglu_hidden

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "sdpa", "flash", "flex")


# ----------------------------------------------------------------------------- rotary
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """(head_dim/2,) float64 inverse frequencies theta^(-2i/hd), and the factor cos and sin
    are multiplied by. ``scaling`` extends the context of a trained model (Hugging Face's
    ``rope_parameters`` / ``rope_scaling`` keys):
      linear  every frequency divided by ``factor`` (positions interpolated);
      llama3  low frequencies (wavelength > original_max_position_embeddings / low_freq_factor)
              divided by ``factor``, high ones kept, a smooth blend between (Llama 3.1);
      yarn    per-frequency blend of interpolation and extrapolation over a ramp between
              beta_fast and beta_slow rotations, cos/sin scaled by 0.1 ln(factor) + 1 (YaRN).
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not one of {ROPE_TYPES}")
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelength = 2 * math.pi / inv
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short
        return inv * (smooth + (1 - smooth) / factor), 1.0
    # yarn: rotations r over the original context happen at dimension d(r); below d(beta_fast)
    # keep the frequency, above d(beta_slow) interpolate, linearly in between.
    def dim_of(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    blended = inv / factor * ramp + inv * (1 - ramp)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return blended, float(attn)


def rope_tables(head_dim: int, max_len: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim) for Llama's rotate-half convention."""
    inv_freq, attn = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attn).float(), (angles.sin() * attn).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd); cos, sin: (T, hd), or (B, T, hd) when rows sit at different
    positions. Rotates pairs (i, i + hd/2)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- KV caches
@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, growing one slice per forward.

    k, v: (B, H_kv, max_len, hd); the first ``pos`` positions are filled.
    ``tree``: set by tree decoders (Medusa) before a forward of T candidate tokens, a
    (T, T) bool mask, True where candidate i may see candidate j (its ancestors and
    itself); positions are then ``pos + depth``. ``keep`` afterwards retains the
    accepted candidates and ``rewind`` forgets the last tokens (speculative decoding).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0
    tree: torch.Tensor | None = None

    def positions(self, t: int, device) -> torch.Tensor:
        """(t,) rotary positions of the next t tokens."""
        if self.tree is not None:
            return self.pos + self.tree.sum(-1) - 1
        return torch.arange(self.pos, self.pos + t, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, hd) at the next positions; return all keys and values so
        far and the (T, pos + T) bool mask to use, or None for the plain causal mask."""
        t, end = k.shape[2], self.pos + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        mask = None
        if self.tree is not None:
            mask = torch.cat([self.tree.new_ones(t, self.pos), self.tree], dim=-1)
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end], mask

    def rewind(self, n: int) -> None:
        """Forget the last n tokens."""
        self.pos -= n

    def reset(self) -> None:
        self.pos, self.tree = 0, None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (repeats allowed), in that order."""
        self.k, self.v = take_rows(self.k, index), take_rows(self.v, index)

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Of the tokens stored from ``start`` on, keep those at ``start + index`` (in that
        order, moved to ``start``...) and forget the rest; clears ``tree``."""
        src = start + index.to(self.k.device)
        self.k[:, :, start:start + len(index)] = self.k[:, :, src]
        self.v[:, :, start:start + len(index)] = self.v[:, :, src]
        self.pos, self.tree = start + len(index), None


@dataclass
class StaticKVCache:
    """A cache whose shapes never change, for compiled decode steps (CUDA graphs).

    k, v: (B, H_kv, max_len, hd); ``pos``: a 0-d long tensor advanced in place. Every
    forward attends over all max_len slots with a mask hiding the empty ones, so the
    step is the same graph for every position. ``tree`` / ``keep`` (a candidate tree,
    as KVCache's) and ``rewind`` keep those shapes too, so a compiled Medusa or
    speculative verify step is also one graph (``decoder.compile``).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    tree: torch.Tensor | None = None

    def positions(self, t: int, device) -> torch.Tensor:
        if self.tree is not None:
            return self.pos + self.tree.sum(-1) - 1
        return self.pos + torch.arange(t, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        slots = self.pos + torch.arange(t, device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        keys = torch.arange(self.k.shape[2], device=k.device)
        if self.tree is None:
            mask = keys[None, :] <= slots[:, None]
        else:  # the earlier tokens, and among the candidates the query's ancestors
            rel = keys - self.pos  # key slot relative to the first candidate
            mask = (rel < 0)[None, :] | (self.tree[:, rel.clamp(0, t - 1)] & (rel < t)[None, :])
        self.pos.add_(t)
        return self.k, self.v, mask

    def rewind(self, n: int) -> None:
        """Forget the last n tokens."""
        self.pos.sub_(n)

    def keep(self, start: int, index: torch.Tensor) -> None:
        """As ``KVCache.keep``: of the tokens from ``start`` on keep those at ``start + index``."""
        src = start + index.to(self.k.device)
        self.k[:, :, start:start + len(index)] = self.k[:, :, src]
        self.v[:, :, start:start + len(index)] = self.v[:, :, src]
        self.pos.fill_(start + len(index))
        self.tree = None

    def reset(self) -> None:
        self.k.zero_(), self.v.zero_(), self.pos.zero_()
        self.tree = None

    def reorder(self, index: torch.Tensor) -> None:
        if len(index) != self.k.shape[0]:
            raise ValueError(f"a static KV cache keeps its {self.k.shape[0]} rows: reorder with as many, got {len(index)}")
        take_rows(self.k, index), take_rows(self.v, index)


@dataclass
class RowKVCache:
    """A KV cache whose rows are independent sequences, each at its own position
    (``init_state(..., rows=True)``; a server's continuous batching).

    k, v: (B, H_kv, max_len, hd); ``pos`` (B,) long: row b holds ``pos[b]`` tokens. A
    forward of T tokens writes each row's keys at its own next positions and attends up
    to the longest row with a per-row mask, so rows that started at different times
    decode together. ``put`` moves a prefilled sequence into a row; ``head(b)`` is the
    first b rows, sharing storage.

    ``lens`` mirrors ``pos`` on the host (a list shared with the ``head`` views), so the
    longest row is known without a device sync in every layer's forward.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    lens: list[int] = field(default_factory=list)
    tree: torch.Tensor | None = None  # as KVCache.tree: one (T, T) candidate tree for every row

    def __post_init__(self):
        if not self.lens:
            self.lens.extend(self.pos.tolist())
        self.rows = len(self.pos)  # this view's rows: the first ``rows`` entries of ``lens``

    def positions(self, t: int, device) -> torch.Tensor:
        """(B, t) rotary positions of each row's next t tokens (with a tree: pos + depth)."""
        if self.tree is not None:
            return self.pos[:, None] + (self.tree.sum(-1) - 1).to(device)[None]
        return self.pos[:, None] + torch.arange(t, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        slots = self.pos[:, None] + torch.arange(t, device=k.device)  # (B, t) where they are stored
        end = max(self.lens[: self.rows]) + t  # the longest row after this forward
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache full: a row would hold more than max_len {self.k.shape[2]} tokens")
        where = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, where, k), self.v.scatter_(2, where, v)
        keys = torch.arange(end, device=k.device)
        if self.tree is None:
            mask = keys <= slots[:, :, None]  # (B, t, end)
        else:  # the row's earlier tokens, and among the candidates the query's ancestors
            rel = keys[None, :] - self.pos[:, None]  # (B, end): key slot relative to the first candidate
            in_tree = self.tree.to(k.device)[:, rel.clamp(0, t - 1)].permute(1, 0, 2)  # (B, t, end)
            mask = (rel < 0)[:, None, :] | (in_tree & (rel < t)[:, None, :])
        self.pos.add_(t)
        self.lens[: self.rows] = [n + t for n in self.lens[: self.rows]]
        return self.k[:, :, :end], self.v[:, :, :end], mask[:, None]

    def keep(self, start: Sequence[int], index: Sequence[torch.Tensor]) -> None:
        """Per row b: of the tokens stored from ``start[b]`` on, keep those at ``start[b] +
        index[b]`` (moved to ``start[b]``...) and forget the rest; clears ``tree``."""
        for b, (s, idx) in enumerate(zip(start, index)):
            src = s + idx.to(self.k.device)
            self.k[b, :, s:s + len(idx)], self.v[b, :, s:s + len(idx)] = self.k[b, :, src], self.v[b, :, src]
            self.lens[b] = s + len(idx)
        self.pos.copy_(torch.tensor(self.lens[: self.rows], device=self.pos.device))
        self.tree = None

    def put(self, row: int, other: KVCache | RowKVCache, other_row: int = 0) -> None:
        """Row ``row`` becomes row ``other_row`` of ``other`` (its tokens and position)."""
        n = other.lens[other_row] if isinstance(other, RowKVCache) else other.pos
        self.k[row, :, :n], self.v[row, :, :n] = other.k[other_row, :, :n], other.v[other_row, :, :n]
        self.pos[row], self.lens[row] = n, n

    def head(self, rows: int) -> RowKVCache:
        return RowKVCache(self.k[:rows], self.v[:rows], self.pos[:rows], self.lens)

    def rewind(self, n: int | Sequence[int]) -> None:
        """Forget the last n tokens of every row, or ``n[b]`` of row b."""
        n = [n] * self.rows if isinstance(n, int) else list(n)
        self.pos -= torch.tensor(n, dtype=self.pos.dtype, device=self.pos.device)
        self.lens[: self.rows] = [a - b for a, b in zip(self.lens[: self.rows], n)]

    def reset(self) -> None:
        self.pos.zero_()
        self.lens[: self.rows] = [0] * self.rows
        self.tree = None

    def reorder(self, index: torch.Tensor) -> None:
        """New rows ``index`` (repeats allowed): in place when the row count stays (as
        ``take_rows``), else new tensors that no longer share storage."""
        lens = [self.lens[i] for i in torch.as_tensor(index).tolist()]
        self.k, self.v, self.pos = take_rows(self.k, index), take_rows(self.v, index), take_rows(self.pos, index)
        if len(lens) == self.rows:
            self.lens[: self.rows] = lens
        else:
            self.lens, self.rows = lens, len(lens)


# ----------------------------------------------------------------------------- attention kernels
def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """(t_q, t_k) bool, True where query i (the last t_q of t_k positions) may see key j."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return torch.arange(t_k, device=device)[None, :] <= q_pos


def window_mask(q_pos: torch.Tensor, t_k: int, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """With per-row positions ``q_pos`` (B, Tq) the result is (B, 1, Tq, t_k).
``mask`` (or the causal one) restricted to keys less than ``window`` positions
    before each query; ``q_pos`` (Tq,) are the queries' positions among the t_k keys."""
    k_pos = torch.arange(t_k, device=q_pos.device)
    near = k_pos > q_pos[..., None] - window
    if q_pos.dim() == 2:
        near = near[:, None]
    return near & (k_pos <= q_pos[..., None] if mask is None else mask)


def attention_reference(q, k, v, mask=None):
    """q: (B, H, Tq, hd), k, v: (B, H_kv, Tk, hd), the queries being the last Tq positions.
    ``mask`` (Tq, Tk) bool, True where a query may see a key; None: causal.
    Explicit float32 softmax; key/value heads repeated for grouped-query attention."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if mask is None else mask
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention_sdpa(q, k, v, mask=None):
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None and t_q > 1:
        mask = causal_mask(t_q, t_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention_flash(q, k, v, mask=None):
    if mask is not None:  # flash-attn has no arbitrary masks (tree / static caches): use SDPA
        return attention_sdpa(q, k, v, mask)
    from flash_attn import flash_attn_func  # CUDA-only; imported lazily

    # flash-attn takes (B, T, H, hd) and aligns the causal mask to the bottom right.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401 - importable with its CUDA extension?
    except Exception:  # noqa: BLE001 - any failure (missing, no CUDA ext) means unavailable
        return False
    return torch.cuda.is_available()


def attention_flex(q, k, v, mask=None):
    """``backend=flex`` on unpacked rows: flex_attention only serves packed rows (its block
    mask), so plain causal or cache masks go to SDPA."""
    return attention_sdpa(q, k, v, mask)


KERNELS = {"reference": attention_reference, "sdpa": attention_sdpa, "flash": attention_flash, "flex": attention_flex}


# ----------------------------------------------------------------------------- packed rows
def packed_mask(segments: Segments, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool: same document, causal, and with ``window`` less than window tokens back."""
    mask = segments.mask()
    if window:
        key = ("window", window)
        if key not in segments.cache:
            t = torch.arange(mask.shape[-1], device=mask.device)
            segments.cache[key] = mask & (t[None, :] > t[:, None] - window)
        mask = segments.cache[key]
    return mask


_flex = None


def flex_block_mask(segments: Segments, window: int | None):
    """flex_attention's BlockMask of the packed rows, built once per batch (kept in ``segments.cache``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", window)
    if key not in segments.cache:
        doc = segments.doc_ids
        B, T = doc.shape

        def same_document(b, h, q_idx, kv_idx):
            keep = (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)
            return keep & (kv_idx > q_idx - window) if window else keep

        segments.cache[key] = create_block_mask(same_document, B, None, T, T, device=doc.device)
    return segments.cache[key]


def attention_packed(backend: str, q, k, v, segments: Segments, window: int | None):
    """Attention of packed rows (q: (B, H, T, hd), k, v: (B, H_kv, T, hd)), documents kept apart."""
    if backend == "flex":
        global _flex
        from torch.nn.attention.flex_attention import flex_attention

        if _flex is None:
            _flex = torch.compile(flex_attention, dynamic=False)
        return _flex(q, k, v, block_mask=flex_block_mask(segments, window), enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flash":  # pragma: no cover - CUDA only; not run yet (no GPU test covers it)
        from flash_attn import flash_attn_varlen_func

        B, H, T, hd = q.shape
        starts = (segments.positions.flatten() == 0).nonzero().flatten()
        cu = F.pad(starts, (0, 1), value=B * T).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True,
                                     window_size=(window - 1, 0) if window else (-1, -1))
        return out.view(B, T, H, hd).transpose(1, 2)
    return KERNELS[backend](q, k, v, packed_mask(segments, window))


def pick_backend(requested: str, x: torch.Tensor, packed: bool = False) -> str:
    flash_ok = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and flash_available()
    if requested == "flex" and packed and not x.is_cuda and torch.is_grad_enabled():
        raise RuntimeError("attention backend 'flex' cannot train on CPU (flex_attention has no CPU backward); "
                           "use backend=auto (sdpa with a dense document mask there)")
    if requested == "auto":  # packed rows: the dense-mask SDPA (flex and flash's varlen path not yet run on a GPU)
        return "sdpa" if packed else "flash" if flash_ok else "sdpa"
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed, a CUDA tensor and fp16/bf16 "
            f"(got device={x.device}, dtype={x.dtype}); use backend=auto or sdpa"
        )
    return requested


# ----------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions. (B, T, D) -> (B, T, D).

    Options of the model families Hugging Face checkpoints come in (all off by default):
    ``head_dim`` other than dim / n_heads, biases on q/k/v (Qwen2) or on the output,
    ``qk_norm`` (RMSNorm of each query and key head before the rotation: Qwen3),
    ``rope_scaling`` (see ``rope_frequencies``) and ``sliding_window`` (each query sees
    itself and the window - 1 keys before it: Mistral).
    """

    capabilities = frozenset({KV_CACHE, STATEFUL, STATIC_STATE, TREE_MASK, TENSOR_PARALLEL, ROW_STATE, PACKED})
    # Tensor parallel: whole heads per process (n_kv_heads divisible by the degree).
    tensor_parallel_plan = {"q": "colwise", "k": "colwise", "v": "colwise", "out": "rowwise"}

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, max_seq_len: int,
                 rope_theta: float = 10000.0, backend: str = "auto", layer_idx: int = 0, *,
                 head_dim: int | None = None, qkv_bias: bool = False, out_bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-5, rope_scaling: dict | None = None,
                 sliding_window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim or dim // n_heads
        self.backend, self.backend_used, self.layer_idx = backend, None, layer_idx
        hd = self.head_dim
        self.q = nn.Linear(dim, n_heads * hd, bias=qkv_bias)
        self.k = nn.Linear(dim, n_kv_heads * hd, bias=qkv_bias)
        self.v = nn.Linear(dim, n_kv_heads * hd, bias=qkv_bias)
        self.out = nn.Linear(n_heads * hd, dim, bias=out_bias)
        self.out.residual_out = True
        self.q_norm = RMSNorm(hd, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(hd, norm_eps) if qk_norm else None
        self.sliding_window = sliding_window
        self.rope_theta, self.rope_scaling, self.max_seq_len = rope_theta, rope_scaling, max_seq_len
        cos, sin = rope_tables(hd, max_seq_len, rope_theta, rope_scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_extra_parameters(self) -> None:
        # Buffers are not saved; rebuild them in float32 (e.g. after meta-device init).
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.rope_theta, self.rope_scaling)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q, k: (B, T, H, hd) -> (B, H, T, hd). ``kernels=liger`` swaps in a fused kernel."""
        return apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, state: KVCache | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        # -1: the heads this process holds (all of them unless tensor parallel)
        q, k, v = self.q(x).view(B, T, -1, hd), self.k(x).view(B, T, -1, hd), self.v(x).view(B, T, -1, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if segments is not None:  # packed rows: positions restart with each document
            positions = segments.positions
        else:
            positions = torch.arange(T, device=x.device) if state is None else state.positions(T, x.device)
        cos, sin = (self.cos[:T], self.sin[:T]) if state is None and segments is None else \
            (self.cos[positions], self.sin[positions])
        q, k = self.rotary(q, k, cos, sin)
        v = v.transpose(1, 2)
        if segments is not None:
            y = attention_packed(self._backend(x, packed=True), q, k, v, segments, self.sliding_window)
            return self.out(y.transpose(1, 2).reshape(B, T, -1))
        mask = None
        if state is not None:
            k, v, mask = state.append(k, v)
        if self.sliding_window and k.shape[2] > self.sliding_window:
            mask = window_mask(positions, k.shape[2], self.sliding_window, mask)
        y = KERNELS[self._backend(x)](q, k, v, mask)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def _backend(self, x: torch.Tensor, packed: bool = False) -> str:
        """The kernel for this call: picked once (once for packed rows, once for the rest), logged once."""
        key = "backend_packed" if packed else "backend_used"
        if getattr(self, key, None) is None:
            setattr(self, key, pick_backend(self.backend, x, packed))
            if self.layer_idx == 0:
                log.info("attention backend%s: %s (requested %s)", " (packed rows)" if packed else "",
                         getattr(self, key), self.backend)
        return getattr(self, key)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, plus QK^T and AV over the full context (as dense kernels compute them)."""
        context = min(seq_len, self.sliding_window or seq_len)
        return 2 * sum(m.in_features * m.out_features for m in (self.q, self.k, self.v, self.out)) \
            + 4 * context * self.n_heads * self.head_dim

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None,
                   static: bool = False, rows: bool = False) -> KVCache | StaticKVCache | RowKVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        if rows:
            return RowKVCache(k, v, torch.zeros(batch_size, dtype=torch.long, device=device))
        if static:
            return StaticKVCache(k, v, torch.zeros((), dtype=torch.long, device=device))
        return KVCache(k, v)


class DenseBlock(ResidualBlock):
    """Llama-style block: x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x)).
    The keyword-only options are Attention's (Qwen, Mistral and Llama 3 checkpoints)."""

    capabilities = Attention.capabilities

    def __init__(self, dim: int, n_heads: int, max_seq_len: int, n_kv_heads: int | None = None,
                 ffn_hidden: int | None = None, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 backend: str = "auto", layer_idx: int = 0, *, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False,
                 rope_scaling: dict | None = None, sliding_window: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        mixer = Attention(dim, n_heads, n_kv_heads or n_heads, max_seq_len, rope_theta, backend, layer_idx,
                          head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm,
                          norm_eps=norm_eps, rope_scaling=rope_scaling, sliding_window=sliding_window)
        super().__init__(mixer, SwiGLU(dim, swiglu_hidden(dim, ffn_hidden)), dim, norm_eps)


# ----------------------------------------------------------------------------- config checks
def check_heads(node: DictConfig, cfg: DictConfig) -> list[str]:
    """Head counts that cannot split ``dim`` (called by core for every attention node,
    nested ones -- inside block=moe or hybrid -- included)."""
    problems = []
    dim, heads, kv = node.get("dim"), node.get("n_heads"), node.get("n_kv_heads") or node.get("n_heads")
    if not (isinstance(heads, int) and heads > 0):
        return [f"n_heads must be a positive integer, got {heads!r}"]
    head_dim = node.get("head_dim")
    if head_dim is not None:
        if not (isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0):
            problems.append(f"head_dim={head_dim!r} must be a positive even integer (rotary embeddings) or null")
    elif dim % heads:
        problems.append(f"n_heads={heads} does not divide dim={dim} "
                        f"(allowed n_heads: {[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]}, "
                        "or give head_dim)")
    elif (dim // heads) % 2:
        problems.append(f"head size dim/n_heads={dim // heads} must be even for rotary embeddings")
    window = node.get("sliding_window")
    if window is not None and not (isinstance(window, int) and window > 0):
        problems.append(f"sliding_window={window!r} must be a positive integer or null")
    scaling = node.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            problems.append(f"rope_scaling.rope_type={kind!r} is not one of {list(ROPE_TYPES)}")
        elif kind != "default" and "factor" not in scaling:
            problems.append(f"rope_scaling ({kind}) needs a factor")
    if not (isinstance(kv, int) and kv > 0 and heads % kv == 0):
        problems.append(f"n_kv_heads={kv} must divide n_heads={heads} "
                        f"(allowed: {[k for k in range(1, heads + 1) if heads % k == 0]})")
    if node.get("backend", "auto") not in BACKENDS:
        problems.append(f"backend={node.get('backend')!r} is not one of {list(BACKENDS)}")
    elif node.get("backend") == "flash" and not flash_available():
        problems.append("backend=flash needs flash-attn with its CUDA extension, which does not import here: "
                        "use backend=auto (flash where it can run, else sdpa) or sdpa")
    return problems


Attention.check = staticmethod(check_heads)
DenseBlock.check = staticmethod(check_heads)
