"""Sharding helpers that several parallel strategies share (FSDP, FSDP x tensor parallel,
FSDP x pipeline): activation checkpointing per block, FSDP2 ``fully_shard`` with a
precision/offload policy, and gradient clipping over mixed layouts."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checkpointed(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    @functools.wraps(forward)
    def run(x, *, state=None, **kw):  # kw: segments of packed rows
        if state is not None or not torch.is_grad_enabled():
            return forward(x, state=state, **kw)
        return checkpoint(forward, x, use_reentrant=False, **kw)

    block.forward = run


def shard(module: nn.Module, device_mesh: Any, *, reshard_after_forward: bool, mixed_precision: str | None = None,
          cpu_offload: bool = False) -> None:
    """FSDP2 ``fully_shard(module)`` over the mesh's ``data_parallel`` dimension, with
    ``mixed_precision`` parameters for compute (fp32 gradient reduction) and optional CPU offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": device_mesh["data_parallel"] if device_mesh is not None else None}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=PRECISIONS[mixed_precision], reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    fully_shard(module, reshard_after_forward=reshard_after_forward, **kw)


def shard_stack(root: nn.Module, blocks: Iterable[nn.Module], device_mesh: Any, *, reshard_after_forward: bool = True,
                activation_checkpointing: bool = False, **policy: Any) -> None:
    """Shard each block (recomputed in backward when asked), then ``root`` -- the module
    holding the rest (embedding, final norm, head), kept gathered after its forward."""
    for block in blocks:
        if activation_checkpointing:
            checkpointed(block)
        shard(block, device_mesh, reshard_after_forward=reshard_after_forward, **policy)
    shard(root, device_mesh, reshard_after_forward=False, **policy)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group: Any = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model mixing plain tensors and DTensors
    on different meshes (tensor parallel leaves norms plain; a pipeline stage holds only
    its layers: ``group`` is then the process group whose squared norms add up).
    Returns the total norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    by_layout: dict[Any, list[torch.Tensor]] = {}
    for g in grads:  # one reduction per (mesh, placements), as torch does for one mesh
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        by_layout.setdefault(key, []).append(g)
    squares = []
    for key, gs in by_layout.items():
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in gs]))
        squares.append((n.full_tensor() if isinstance(n, DTensor) else n) ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=group)
    total = total.sqrt()
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return total
