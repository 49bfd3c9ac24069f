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

from typing import Any

from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.sharding import PRECISIONS, shard_stack


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

    def parallelize(self, model: nn.Module, device_mesh: Any) -> nn.Module:
        # each block, then the rest (embedding, final norm, head)
        shard_stack(model, model.blocks, device_mesh, reshard_after_forward=self.reshard_after_forward,
                    activation_checkpointing=self.activation_checkpointing,
                    mixed_precision=self.mixed_precision, cpu_offload=self.cpu_offload)
        return model

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        problems = []
        devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
        if node.get("devices") != devices or node.get("num_nodes", 1) != nodes:
            problems.append(f"parallel.devices={node.get('devices')} / parallel.num_nodes={node.get('num_nodes', 1)} "
                            f"must equal trainer.devices={devices} / trainer.num_nodes={nodes} (the mesh is the world)")
        if not isinstance(devices, int) or devices < 1:
            problems.append(f"parallel=fsdp needs an integer trainer.devices (processes per node), got {devices!r}")
        if node.get("mixed_precision") not in PRECISIONS:
            problems.append(f"parallel.mixed_precision={node.get('mixed_precision')!r} is not one of {list(PRECISIONS)}")
        if cfg.trainer.get("compile"):
            problems.append("trainer.compile=true is not supported with parallel=fsdp yet")
        return problems
