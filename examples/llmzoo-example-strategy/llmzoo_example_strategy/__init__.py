"""parallel=recompute: activation recomputation on every ``every``-th block, on one device
or data-parallel over ``trainer.devices`` processes (Lightning's DDP: gloo on CPU).

A parallel strategy is ``lightning_strategy()`` (what the Trainer gets) and
``parallelize(model, device_mesh)``, a plain function over the unchanged model
(torchtitan's style); here it wraps blocks with ``llmzoo.shared.sharding.checkpointed``.
The math is unchanged, so losses equal a plain run's (``llmzoo.testing.check_strategy``).
"""

from __future__ import annotations

from pathlib import Path

from llmzoo import hookimpl
from llmzoo.shared.sharding import checkpointed


class Recompute:
    requires: frozenset[str] = frozenset()  # block capabilities it needs

    def __init__(self, every: int = 1, devices: int = 1):
        self.every, self.devices = every, devices

    @staticmethod
    def check(node, cfg) -> list[str]:
        problems = []
        if not (isinstance(node.get("every"), int) and node.get("every") >= 1):
            problems.append(f"every={node.get('every')!r} is not allowed: an integer >= 1")
        if not (isinstance(node.get("devices"), int) and node.get("devices") >= 1):
            problems.append(f"devices={node.get('devices')!r} is not allowed: an integer >= 1 (trainer.devices)")
        return problems

    def lightning_strategy(self):
        if self.devices == 1:
            return "auto"
        import torch
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if torch.cuda.is_available() else "gloo")

    def parallelize(self, model, device_mesh=None):
        for i, block in enumerate(model.blocks):
            if i % self.every == 0:
                checkpointed(block)
        return model


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
