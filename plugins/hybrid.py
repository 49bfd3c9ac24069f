"""Hybrid stacks (``block=hybrid``): the block of each layer is chosen by a pattern,
from named sequence mixers (attention, mamba2, ...) and channel mixers (swiglu, moe, ...).

Layer i uses ``mixer_pattern[i % len(mixer_pattern)]`` and
``ffn_pattern[i % len(ffn_pattern)]``. The shipped preset (conf/block/hybrid.yaml)
is Jamba-like: Mamba-2 and attention alternate, and so do a dense MLP and an MoE.
Every part is a config node with a ``_target_``, so any mixer from any plugin fits.
Decoding works across the mixed states because each layer keeps its own.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from llmzoo.config import target_class
from llmzoo.interfaces import TENSOR_PARALLEL, capabilities_of
from llmzoo.layers import ResidualBlock


class HybridBlock(ResidualBlock):
    def __init__(self, dim: int, mixers: dict[str, Any], ffns: dict[str, Any], mixer_pattern: list[str],
                 ffn_pattern: list[str], norm_eps: float = 1e-5, layer_idx: int = 0):
        self.kind = (mixer_pattern[layer_idx % len(mixer_pattern)], ffn_pattern[layer_idx % len(ffn_pattern)])
        mixer = instantiate(mixers[self.kind[0]], layer_idx=layer_idx, _convert_="all")
        ffn_node = ffns.get(self.kind[1])
        super().__init__(mixer, instantiate(ffn_node, _convert_="all") if ffn_node else None, dim, norm_eps)

    def extra_repr(self) -> str:
        return f"kind={self.kind[0]}+{self.kind[1]}"

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        problems = []
        for key, table in (("mixer_pattern", "mixers"), ("ffn_pattern", "ffns")):
            pattern = node.get(key) or []
            if not pattern:
                problems.append(f"{key} is empty: give a list of names from block.{table}")
            unknown = [p for p in pattern if p not in node.get(table, {})]
            if unknown:
                problems.append(f"{key} names {unknown}, not in block.{table} "
                                f"(allowed: {sorted(node.get(table, {}).keys())})")
        return problems

    @staticmethod
    def part_capabilities(node: DictConfig) -> dict[str, frozenset[str]]:
        """Capabilities of each mixer the pattern uses, for config-time checks."""
        used = [n for n in dict.fromkeys(node.mixer_pattern) if n in node.mixers]  # unknown names: see validate
        ffns = [node.ffns[n] for n in dict.fromkeys(node.ffn_pattern) if n in node.ffns and node.ffns[n]]
        # tensor parallel needs a plan for every ffn too
        no_plan = frozenset({TENSOR_PARALLEL}) if any(
            not hasattr(target_class(f._target_), "tensor_parallel_plan") for f in ffns) else frozenset()
        return {f"hybrid mixer {name!r} ({node.mixers[name]._target_})":
                capabilities_of(target_class(node.mixers[name]._target_)) - no_plan
                for name in used}
