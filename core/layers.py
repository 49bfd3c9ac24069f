"""Layers more than one plugin builds on: RMSNorm, the SwiGLU MLP and ResidualBlock."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .interfaces import PACKED, BlockExtras, Segments, capabilities_of


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32. x: (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def swiglu_hidden(dim: int, hidden: int | None = None, multiple_of: int = 32) -> int:
    """Llama's rule: 2/3 of 4*dim, rounded up to ``multiple_of``, unless given."""
    if hidden:
        return hidden
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). (B, T, D) -> (B, T, D).
    ``hidden`` None: Llama's 8/3 * dim rounded up to 32.

    Separate gate and up projections (as Llama's): tensor parallelism splits each by
    hidden units, and on CPU two matmuls cost no more than one fused one plus its split.
    """

    tensor_parallel_plan = {"gate": "colwise", "up": "colwise", "down": "rowwise"}

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.hidden = hidden = swiglu_hidden(dim, hidden)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        setattr(self.down, "residual_out", True)  # scaled at init, see LanguageModel.reset_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def flops_per_token(self, seq_len: int) -> float:
        return 2 * self.down.out_features * self.hidden * 3


class ResidualBlock(nn.Module):
    """The standard pre-norm block: x + mixer(norm(x)), then x + ffn(norm(x)).

    ``mixer`` mixes along time (attention, Mamba, ...) and owns the decode-time
    state; ``ffn`` mixes channels (MLP, MoE) or is None. Capabilities and the
    state come from the mixer, the auxiliary loss from the ffn.
    """

    def __init__(self, mixer: nn.Module, ffn: nn.Module | None, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.mixer_norm = RMSNorm(dim, norm_eps)
        self.mixer: Any = mixer  # parts with Block's members (and BlockExtras')
        self.ffn_norm = RMSNorm(dim, norm_eps) if ffn is not None else None
        self.ffn: Any = ffn

    @property
    def capabilities(self) -> frozenset[str]:
        caps = capabilities_of(self.mixer)
        if self.ffn is not None and BlockExtras.of(self.ffn).tensor_parallel_plan is None:
            caps -= {"tensor_parallel"}  # the mixer alone cannot make the block tensor-parallel
        return caps

    @property
    def tensor_parallel_plan(self) -> dict[str, str]:
        """The mixer's and the ffn's plans under their names here, the norms as "norm"
        (sharded along the sequence under sequence parallelism)."""
        # the parts are read when asked: adapters (peft) may have replaced them since
        mixer, ffn = BlockExtras.of(self.mixer), BlockExtras.of(self.ffn)
        plan = {"mixer_norm": "norm", **{f"mixer.{k}": v for k, v in (mixer.tensor_parallel_plan or {}).items()}}
        if self.ffn is not None:
            plan.update({"ffn_norm": "norm", **{f"ffn.{k}": v for k, v in (ffn.tensor_parallel_plan or {}).items()}})
        return plan

    def forward(self, x: torch.Tensor, *, state: Any = None, segments: Segments | None = None) -> torch.Tensor:
        if segments is not None:  # packed rows: the mixer keeps documents apart; a PACKED ffn is told too
            x = x + self.mixer(self.mixer_norm(x), segments=segments)
            kw = {"segments": segments} if PACKED in capabilities_of(self.ffn) else {}
        else:
            x, kw = x + self.mixer(self.mixer_norm(x), state=state), {}
        if self.ffn_norm is not None:  # with the ffn
            x = x + self.ffn(self.ffn_norm(x), **kw)
        return x

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None, **kw: Any) -> Any:
        init = BlockExtras.of(self.mixer).init_state
        return init(batch_size, max_len, device=device, dtype=dtype, **kw) if init is not None else None

    def aux_loss(self) -> torch.Tensor | None:
        # BlockExtras.aux_loss, read with getattr (not BlockExtras.of) so that a compiled
        # (fullgraph) decode step traces through it; the ffn may be an adapter's wrapper by now
        fn = getattr(self.ffn, "aux_loss", None)
        return fn() if fn is not None else None

    def flops_per_token(self, seq_len: int) -> float | None:
        """Forward matmul FLOPs per token of the mixer and the ffn (norms not counted);
        None if a part does not say (``flops_per_token`` is optional)."""
        return flops_of([self.mixer] + ([self.ffn] if self.ffn is not None else []), seq_len)


def flops_of(parts: Any, seq_len: int) -> float | None:
    """The sum of the parts' ``flops_per_token(seq_len)``; None if one does not say."""
    total = 0.0
    for part in parts:
        count = BlockExtras.of(part).flops_per_token
        n = count(seq_len) if count is not None else None
        if n is None:
            return None
        total += n
    return total
