"""Data-parallel strategies: ``parallel=single`` (one device) and ``parallel=ddp``
(one model replica per process, gradients all-reduced; gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn



class Replicated:
    """Every process holds the whole model: ``parallelize`` leaves it unchanged."""

    requires: frozenset[str] = frozenset()

    def lightning_strategy(self) -> Any:
        return "auto"

    def parallelize(self, model: nn.Module, device_mesh: Any = None) -> nn.Module:
        return model


class SingleDevice(Replicated):
    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        devices = cfg.trainer.get("devices", 1)
        if devices not in (1, "1", "auto"):
            return [f"parallel=single runs one process, but trainer.devices={devices}: use parallel=ddp"]
        return []


class DDP(Replicated):
    """``backend``: ``gloo``, ``nccl`` or ``auto`` (NCCL when CUDA is used, else gloo)."""

    def __init__(self, backend: str = "auto", find_unused_parameters: bool = False):
        self.backend, self.find_unused_parameters = backend, find_unused_parameters

    def lightning_strategy(self) -> Any:
        import torch
        from lightning.pytorch.strategies import DDPStrategy

        backend = self.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=self.find_unused_parameters)
