"""``llmzoo.shared``: what plugins share but the contract does not need.

A library plugins may use -- decode loops and streams (``decoding``), cross-entropy,
fused cross-entropy and log-prob helpers (``losses``), FSDP2 sharding and clipping
(``sharding``), FLOPs and MFU (``flops``), the default chat format (``chat``), loading
files without running code (``safe_load``), finding and checking data files (``files``). It is
not contract: names here may change between minor versions (CHANGELOG.md says when),
while ``llmzoo.interfaces`` and ``llmzoo.hookspecs`` keep the compatibility promise.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a module whose names moved to ``new``: each one still
    resolves, with a DeprecationWarning naming its new home (kept for one minor version)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old name goes in llmzoo contract 4",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
