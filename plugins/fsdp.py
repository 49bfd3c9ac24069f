"""Fully sharded data parallel (``parallel=fsdp``): torch's FSDP2 ``fully_shard`` on each
block, then on the whole model, over the data-parallel dimension of the device mesh
that Lightning's ``ModelParallelStrategy`` builds (gloo on CPU, NCCL on GPU).

Each process holds 1/N of every parameter, gradient and AdamW state; a block's
parameters are gathered just before its forward (and backward) and freed after
(``reshard_after_forward``). Options: a mixed-precision policy (``mixed_precision:
bf16|fp16`` parameters for compute, fp32 gradient reduction and master weights), CPU
offload of the shards, and activation checkpointing per block (recompute a block's
activations in backward instead of storing them). The model definition is unchanged:
``parallelize(model, mesh)`` is a plain function applied to it (torchtitan's style).

Checkpoints: with ``save_distributed_checkpoint`` each process writes its shard
(``last.ckpt/`` is a folder; it resumes on the same number of processes and
``llmzoo.load_checkpoint`` consolidates it into one process for generation); the final
``model.safetensors`` is gathered in full.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmzoo import hookimpl

PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checkpointed(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    @functools.wraps(forward)
    def run(x, *, state=None):
        if state is not None or not torch.is_grad_enabled():
            return forward(x, state=state)
        return checkpoint(forward, x, use_reentrant=False)

    block.forward = run


class FSDP:
    """``devices`` x ``num_nodes`` processes, all in one data-parallel (sharding) group."""

    requires: frozenset[str] = frozenset()
    uses_device_mesh = True  # parallelize() runs in LightningModule.configure_model with Lightning's mesh

    def __init__(self, devices: int = 2, num_nodes: int = 1, mixed_precision: str | None = None,
                 reshard_after_forward: bool = True, cpu_offload: bool = False,
                 activation_checkpointing: bool = False, backend: str = "auto",
                 save_distributed_checkpoint: bool = True):
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"parallel.mixed_precision={mixed_precision!r} is not one of {list(PRECISIONS)}")
        self.devices, self.num_nodes = int(devices), int(num_nodes)
        self.mixed_precision, self.reshard_after_forward = mixed_precision, reshard_after_forward
        self.cpu_offload, self.activation_checkpointing = cpu_offload, activation_checkpointing
        self.backend, self.save_distributed_checkpoint = backend, save_distributed_checkpoint

    def lightning_strategy(self) -> Any:
        from lightning.pytorch.strategies import ModelParallelStrategy

        backend = None if self.backend == "auto" else self.backend
        return ModelParallelStrategy(data_parallel_size=self.devices * self.num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=self.save_distributed_checkpoint,
                                     process_group_backend=backend)

    def shard(self, module: nn.Module, device_mesh: Any, reshard_after_forward: bool) -> None:
        """``fully_shard(module)`` over the data-parallel dimension with this config's policies."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"mesh": device_mesh["data_parallel"] if device_mesh is not None else None}
        if self.mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=PRECISIONS[self.mixed_precision],
                                                   reduce_dtype=torch.float32)
        if self.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        fully_shard(module, reshard_after_forward=reshard_after_forward, **kw)

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module:
        for block in model.blocks:
            if self.activation_checkpointing:
                checkpointed(block)
            self.shard(block, device_mesh, self.reshard_after_forward)
        self.shard(model, device_mesh, reshard_after_forward=False)  # embedding, final norm, head
        return model


@hookimpl
def llmzoo_validate(cfg: DictConfig) -> list[str]:
    par = cfg.get("parallel")
    if not isinstance(par, DictConfig) or par.get("_target_") != f"{__name__}.FSDP":
        return []
    problems = []
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if par.get("devices") != devices or par.get("num_nodes", 1) != nodes:
        problems.append(f"parallel.devices={par.get('devices')} / parallel.num_nodes={par.get('num_nodes', 1)} must "
                        f"equal trainer.devices={devices} / trainer.num_nodes={nodes} (the mesh is the world)")
    if not isinstance(devices, int) or devices < 1:
        problems.append(f"parallel=fsdp needs an integer trainer.devices (processes per node), got {devices!r}")
    if par.get("mixed_precision") not in PRECISIONS:
        problems.append(f"parallel.mixed_precision={par.get('mixed_precision')!r} is not one of {list(PRECISIONS)}")
    if cfg.trainer.get("compile"):
        problems.append("trainer.compile=true is not supported with parallel=fsdp yet")
    return problems
