"""Fused Triton kernels for GPU training (``kernels=liger``), from Liger-Kernel.

``Liger(...).apply(model)`` swaps the forward of three layers for Liger's kernels:

  rms_norm  ``llmzoo.layers.RMSNorm``: one kernel for the norm and the weight, computed
            in float32 like the reference (Liger's ``casting_mode="gemma"``)
  swiglu    ``llmzoo.layers.SwiGLU``: silu(gate) * up in one kernel (the projections
            stay ``nn.Linear``, so LoRA and tensor-parallel plans still apply)
  rope      ``Attention.rotary``: queries and keys rotated in one kernel

Parameters and state-dict names do not change, so a run trained with the kernels loads
without them and the other way round. Each swapped forward chooses per call: Liger's
kernel on CUDA tensors, the PyTorch reference elsewhere (CPU, or Liger not installed
with ``backend: auto``), so the same config trains on a laptop and a GPU. The parity
tests against the references are in ``tests/gpu/test_triton_kernels.py``.

Liger's fused linear cross-entropy is not a layer: it replaces the head and the loss
together, so it is an objective option, ``objective.fused_ce=true`` (objective=clm or sft;
``llmzoo.shared.losses.linear_cross_entropy``, Liger's kernel on CUDA, a chunked PyTorch
reference elsewhere).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from llmzoo.errors import UserError
from llmzoo.layers import RMSNorm, SwiGLU

log = logging.getLogger(__name__)

BACKENDS = ("auto", "liger", "reference")


def liger_available() -> bool:
    try:
        import liger_kernel.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or no Triton
        return False
    return True


def _use_liger(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call runs Liger's kernel. ``apply`` stored (backend, installed) on the
    module at build time, so nothing is imported inside torch.compile's tracing."""
    backend, installed = module._kernels
    if backend == "reference":
        return False
    ok = x.is_cuda and installed
    if backend == "liger" and not ok:
        raise RuntimeError("kernels.backend=liger needs liger-kernel installed and CUDA tensors; "
                           "use backend=auto to fall back to the PyTorch references")
    return ok


def _rms_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if not _use_liger(self, x):
        return RMSNorm.forward(self, x)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # gemma casting: x, weight and the product in float32, cast back at the end (as RMSNorm)
    return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "gemma", False)


def _swiglu(self: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    if not _use_liger(self, x):
        return SwiGLU.forward(self, x)
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down(LigerSiLUMulFunction.apply(self.gate(x), self.up(x)))


def _rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: (B, T, H, hd) -> (B, H, T, hd) rotated, as ``Attention.rotary``."""
    if not _use_liger(self, q) or cos.dim() != 2:
        return type(self).rotary(self, q, k, cos, sin)
    from liger_kernel.ops.rope import LigerRopeFunction

    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos[None].to(q.dtype), sin[None].to(q.dtype)
    return LigerRopeFunction.apply(q, k, cos, sin, None, 1, None)


class Liger:
    """The ``kernels=liger`` option (``llmzoo.interfaces.Kernels``)."""

    name = "liger"

    def __init__(self, backend: str = "auto", rms_norm: bool = True, swiglu: bool = True, rope: bool = True):
        if backend not in BACKENDS:
            raise UserError(f"kernels.backend={backend!r} is not one of {list(BACKENDS)}")
        self.backend, self.rms_norm, self.swiglu, self.rope = backend, rms_norm, swiglu, rope

    def apply(self, model: nn.Module) -> nn.Module:
        installed = liger_available()
        if self.backend == "liger" and not installed:
            raise UserError("kernels.backend=liger but liger-kernel is not installed (pip install liger-kernel)")
        swapped: dict[str, int] = {}
        for module in model.modules():
            fn = None
            if self.rms_norm and isinstance(module, RMSNorm):
                fn, kind = _rms_norm, "rms_norm"
            elif self.swiglu and isinstance(module, SwiGLU):
                fn, kind = _swiglu, "swiglu"
            elif self.rope and hasattr(type(module), "rotary"):
                fn, kind = _rotary, "rope"
            if fn is None:
                continue
            module._kernels = (self.backend, installed)
            if kind == "rope":
                module.rotary = types.MethodType(fn, module)
            else:
                module.forward = types.MethodType(fn, module)
            swapped[kind] = swapped.get(kind, 0) + 1
        where = "on CUDA tensors" if installed else "nowhere: liger-kernel is not installed"
        log.info("kernels=liger: %s swapped (%s; the PyTorch references elsewhere)",
                 ", ".join(f"{n} {k}" for k, n in swapped.items()) or "nothing", where)
        return model
