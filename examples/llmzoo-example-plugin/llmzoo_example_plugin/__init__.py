"""block=shortconv: a causal depthwise convolution token mixer + SwiGLU MLP.

y[t] = sum_{j<k} w[j] * x[t - j]  (per channel), so the block is causal by
construction; its decode-time state is the last k-1 inputs (fixed size).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmzoo import ResidualBlock, SwiGLU, hookimpl


class ShortConv(nn.Module):
    """(B, T, D) -> (B, T, D): in-projection, causal depthwise conv of width k, gate, out-projection."""

    capabilities = frozenset({"recurrent", "stateful"})

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        self.k = kernel_size
        self.proj_in = nn.Linear(dim, 2 * dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)
        self.proj_out = nn.Linear(dim, dim, bias=False)
        self.proj_out.residual_out = True

    def forward(self, x: torch.Tensor, *, state: dict | None = None) -> torch.Tensor:
        u, gate = self.proj_in(x).chunk(2, dim=-1)
        u = u.transpose(1, 2)  # (B, D, T)
        if state is None:
            history = u.new_zeros(u.shape[0], u.shape[1], self.k - 1)
        else:
            history = state["history"]
        padded = torch.cat([history, u], dim=-1)
        if state is not None:
            state["history"] = padded[..., -(self.k - 1):].clone()
        y = self.conv(padded).transpose(1, 2)
        return self.proj_out(y * F.silu(gate))

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> dict:
        dim = self.proj_out.in_features
        return {"history": torch.zeros(batch_size, dim, self.k - 1, device=device, dtype=dtype)}


class ShortConvBlock(ResidualBlock):
    capabilities = ShortConv.capabilities

    def __init__(self, dim: int, kernel_size: int = 4, ffn_hidden: int | None = None, norm_eps: float = 1e-5,
                 layer_idx: int = 0):
        super().__init__(ShortConv(dim, kernel_size), SwiGLU(dim, ffn_hidden or 2 * dim), dim, norm_eps)


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")


@hookimpl
def llmzoo_validate(cfg) -> list[str]:
    block = cfg.get("block") or {}
    if block.get("_target_") == f"{__name__}.ShortConvBlock" and int(block.get("kernel_size", 4)) < 2:
        return [f"block.kernel_size must be at least 2, got {block.get('kernel_size')}"]
    return []
