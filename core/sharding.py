"""Deprecated alias: moved to ``llmzoo.shared.sharding`` in contract 3 (removed in contract 4)."""

from .shared import moved

__getattr__ = moved(__name__, "llmzoo.shared.sharding")
