"""parallel=recompute: one device, with activation recomputation on every ``every``-th block.

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

    def __init__(self, every: int = 1):
        self.every = every

    @staticmethod
    def check(node, cfg) -> list[str]:
        problems = []
        if not (isinstance(node.get("every"), int) and node.get("every") >= 1):
            problems.append(f"every={node.get('every')!r} is not allowed: an integer >= 1")
        if cfg.trainer.get("devices") not in (1, "1", "auto"):
            problems.append(f"parallel=recompute runs one process, but trainer.devices={cfg.trainer.get('devices')}")
        return problems

    def lightning_strategy(self):
        return "auto"

    def parallelize(self, model, device_mesh=None):
        for i, block in enumerate(model.blocks):
            if i % self.every == 0:
                checkpointed(block)
        return model


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
