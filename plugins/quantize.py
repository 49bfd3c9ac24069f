"""Weight-only quantization of linear layers (``quantize=int8`` / ``quantize=int4``), a
model transform any decoder uses: activations stay in floating point, weights are
stored as integers with floating-point scales and are dequantized inside the matmul.

  int8  per output channel: w ~= q * s,   q in [-127, 127], s = max|w_row| / 127
  int4  per group of ``group_size`` inputs of each output channel (asymmetric):
        w ~= (q - 8) * s + z,  q in [0, 15], s = (max - min) / 15, z = min + 8 s

Every ``nn.Linear`` in the blocks and the vocabulary head is replaced; the embedding
stays in floating point. On CPU the matmuls use torch's packed weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, the latter for output sizes
divisible by 16); elsewhere the weight is dequantized on the fly (the reference path,
always available). An int4 layer whose input size is not a multiple of
``group_size`` stays in floating point (with a warning). ``save_quantized`` /
``load_quantized`` write and read the integer weights with safetensors, so a quantized
model is stored once and loaded without the float weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MODES = ("int8", "int4")


# ----------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q int8 (out, in), scale float32 (out,))."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, reference: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.reference = in_features, out_features, reference
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, reference: bool = False) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, reference).to(linear.weight.device)
        q.weight, q.scale = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not self.reference:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale.to(x.dtype))
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ----------------------------------------------------------------------------- int4
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q uint8 (out, in) with values 0..15, scales_and_zeros
    float32 (in / group_size, out, 2)) in the layout of torch's int4 CPU kernel."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = lo + 8 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 reference: bool = False):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 quantization: group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size, self.reference = in_features, out_features, group_size, reference
        # Two 4-bit values per byte (even column in the low nibble): what is saved.
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_weight: torch.Tensor | None = None  # the CPU kernel's own packing, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, reference: bool = False) -> "Int4Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, reference)
        m = m.to(linear.weight.device)
        q, m.scales_and_zeros = quantize_int4(linear.weight.detach(), group_size)
        m.packed = q[:, 0::2] | (q[:, 1::2] << 4)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def unpacked(self) -> torch.Tensor:
        """(out, in) uint8 values 0..15."""
        return torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        scale, zero = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # (out, groups)
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, self.in_features)

    def _apply(self, fn, *args, **kwargs):  # a move or load invalidates the kernel's packed copy
        self._kernel_weight = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not self.reference and self.out_features % 16 == 0:  # the kernel's tiling
            if self._kernel_weight is None:
                self._kernel_weight = torch._convert_weight_to_int4pack_for_cpu(self.unpacked().int(), 1)
            shape = x.shape
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self._kernel_weight, self.group_size,
                                                 self.scales_and_zeros.to(x.dtype))
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ----------------------------------------------------------------------------- the transform
def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear except inside the embedding."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


class Quantize:
    """``quantize=int8|int4``: ``Quantize(mode)(model)`` replaces the model's linears in place
    and returns it. ``reference``: dequantize-then-matmul instead of the packed CPU kernels."""

    def __init__(self, mode: str = "int8", group_size: int = 32, reference: bool = False):
        if mode not in MODES:
            raise ValueError(f"quantize mode {mode!r} is not one of {MODES}")
        self.mode, self.group_size, self.reference = mode, group_size, reference

    @property
    def name(self) -> str:
        return self.mode if self.mode == "int8" else f"int4-g{self.group_size}"

    def save(self, model: nn.Module, path: str | Path) -> None:
        save_quantized(model, path)

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        return load_quantized(model, path, self.reference)

    def make(self, linear: nn.Linear) -> nn.Module:
        if self.mode == "int8":
            return Int8Linear.from_linear(linear, self.reference)
        if linear.in_features % self.group_size:
            log.warning("int4: %d inputs are not a multiple of group_size=%d; this layer stays in floating point",
                        linear.in_features, self.group_size)
            return linear
        return Int4Linear.from_linear(linear, self.group_size, self.reference)

    def skeleton(self, linear: nn.Linear) -> nn.Module:
        """An empty quantized layer of the right shape, to load saved weights into."""
        if self.mode == "int4" and linear.in_features % self.group_size:
            return linear
        if self.mode == "int8":
            return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, self.reference)
        return Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, self.group_size,
                          self.reference)

    @torch.no_grad()
    def __call__(self, model: nn.Module, *, empty: bool = False) -> nn.Module:
        for parent, name, linear in _targets(model):
            new = self.skeleton(linear) if empty else self.make(linear)
            setattr(parent, name, new.to(linear.weight.device))
        model.quantization = {"mode": self.mode, "group_size": self.group_size}
        return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Quantized weights (integers + scales) to one safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"llmzoo_quantization": json.dumps(model.quantization)})


def load_quantized(model: nn.Module, path: str | Path, reference: bool = False) -> nn.Module:
    """Turn a freshly built float ``model`` into the quantized one saved at ``path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["llmzoo_quantization"])
    Quantize(meta["mode"], meta["group_size"], reference)(model, empty=True)
    model.load_state_dict(load_file(str(path), device=str(next(model.buffers()).device)))
    return model
