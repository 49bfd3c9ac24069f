"""Layers more than one plugin builds on: RMSNorm, the SwiGLU MLP and ResidualBlock."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .interfaces import capabilities_of


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
        self.down.residual_out = True  # scaled at init, see LanguageModel.reset_parameters

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
        self.mixer = mixer
        self.ffn_norm = RMSNorm(dim, norm_eps) if ffn is not None else None
        self.ffn = ffn

    @property
    def capabilities(self) -> frozenset[str]:
        caps = capabilities_of(self.mixer)
        if self.ffn is not None and not hasattr(self.ffn, "tensor_parallel_plan"):
            caps -= {"tensor_parallel"}  # the mixer alone cannot make the block tensor-parallel
        return caps

    @property
    def tensor_parallel_plan(self) -> dict[str, str]:
        """The mixer's and the ffn's plans under their names here, the norms as "norm"
        (sharded along the sequence under sequence parallelism)."""
        plan = {"mixer_norm": "norm", **{f"mixer.{k}": v for k, v in self.mixer.tensor_parallel_plan.items()}}
        if self.ffn is not None:
            plan.update({"ffn_norm": "norm", **{f"ffn.{k}": v for k, v in self.ffn.tensor_parallel_plan.items()}})
        return plan

    def forward(self, x: torch.Tensor, *, state: Any = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), state=state)
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None, **kw: Any) -> Any:
        init = getattr(self.mixer, "init_state", None)
        return init(batch_size, max_len, device=device, dtype=dtype, **kw) if init else None

    def aux_loss(self) -> torch.Tensor | None:
        fn = getattr(self.ffn, "aux_loss", None)
        return fn() if fn is not None else None

    def flops_per_token(self, seq_len: int) -> float | None:
        """Forward matmul FLOPs per token of the mixer and the ffn (norms not counted);
        None if a part does not say (``flops_per_token`` is optional)."""
        counts = [getattr(p, "flops_per_token", lambda _: None)(seq_len) for p in (self.mixer, self.ffn) if p is not None]
        return None if None in counts else sum(counts)
