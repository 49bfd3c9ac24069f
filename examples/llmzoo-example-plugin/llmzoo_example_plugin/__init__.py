"""block=shortconv: a causal depthwise convolution token mixer + SwiGLU MLP.

y[t] = sum_{j<k} w[j] * x[t - j]  (per channel), so the block is causal by
construction; its decode-time state is the last k-1 inputs (fixed size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmzoo import ResidualBlock, SwiGLU, hookimpl


@dataclass
class ConvState:
    """The last k-1 inputs of each row: (B, D, k - 1). See llmzoo.interfaces.DecodeState."""

    history: torch.Tensor

    def reset(self) -> None:
        self.history.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        self.history = self.history[index.to(self.history.device)]


class ShortConv(nn.Module):
    """(B, T, D) -> (B, T, D): in-projection, causal depthwise conv of width k, gate, out-projection."""

    # "packed": packed training rows (data.packing=document) keep their documents apart
    capabilities = frozenset({"recurrent", "stateful", "packed"})

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        self.k = kernel_size
        self.proj_in = nn.Linear(dim, 2 * dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)
        self.proj_out = nn.Linear(dim, dim, bias=False)
        self.proj_out.residual_out = True

    def forward(self, x: torch.Tensor, *, state: ConvState | None = None, segments=None) -> torch.Tensor:
        u, gate = self.proj_in(x).chunk(2, dim=-1)
        if segments is not None:  # packed rows: y[t] takes x[t - j] only from t's own document
            windows = F.pad(u.transpose(1, 2), (self.k - 1, 0)).unfold(-1, self.k, 1)  # (B, D, T, k)
            lags = torch.arange(self.k - 1, -1, -1, device=x.device)
            inside = (segments.positions[:, None, :, None] >= lags).to(u.dtype)
            y = torch.einsum("bdtk,dk->btd", windows * inside, self.conv.weight[:, 0]) + self.conv.bias
            return self.proj_out(y * F.silu(gate))
        u = u.transpose(1, 2)  # (B, D, T)
        history = u.new_zeros(u.shape[0], u.shape[1], self.k - 1) if state is None else state.history
        padded = torch.cat([history, u], dim=-1)
        if state is not None:
            state.history = padded[..., -(self.k - 1):].clone()
        y = self.conv(padded).transpose(1, 2)
        return self.proj_out(y * F.silu(gate))

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> ConvState:
        dim = self.proj_out.in_features
        return ConvState(torch.zeros(batch_size, dim, self.k - 1, device=device, dtype=dtype))


class ShortConvBlock(ResidualBlock):
    capabilities = ShortConv.capabilities

    def __init__(self, dim: int, kernel_size: int = 4, ffn_hidden: int | None = None, norm_eps: float = 1e-5,
                 layer_idx: int = 0):
        super().__init__(ShortConv(dim, kernel_size), SwiGLU(dim, ffn_hidden or 2 * dim), dim, norm_eps)

    @staticmethod
    def check(node, cfg) -> list[str]:
        """Config rules of this block alone; llmzoo prefixes them with the node's key."""
        k = node.get("kernel_size", 4)
        return [] if isinstance(k, int) and k >= 2 else [f"kernel_size must be at least 2, got {k}"]


class FusedGateUp:
    """``kernels=fused_gate_up`` (``llmzoo.interfaces.Kernels``): SwiGLU's gate and up
    projections as one matrix product over their stacked weights, then the split. The
    layers keep their own ``gate`` and ``up`` weights, so checkpoints do not change;
    ``llmzoo.testing.check_kernels`` checks outputs and gradients against the original."""

    name = "fused_gate_up"

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, SwiGLU):
                module.forward = _fused_gate_up.__get__(module)
        return model


def _fused_gate_up(self: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, torch.cat([self.gate.weight, self.up.weight])).split(self.hidden, dim=-1)
    return self.down(F.silu(gate) * up)


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
