"""The plain decoders, one token per step over the blocks' decode-time states
(the loop itself is ``llmzoo.shared.decoding.StepDecoder``):

  decoder=greedy   always the most likely next token
  decoder=sample   softmax(logits / temperature) restricted by top-k / top-p, seeded
"""

from __future__ import annotations

from typing import Any

from llmzoo.shared.decoding import Sampler, StepDecoder, filter_logits

__all__ = ["Greedy", "Sample", "filter_logits"]


class Greedy(StepDecoder):
    """Always the most likely next token."""

    def __init__(self):
        super().__init__(Sampler(temperature=0.0))


class Sample(StepDecoder):
    """Draws from softmax(logits / temperature) restricted by top_k / top_p.
    ``seed`` makes the draws repeatable; temperature 0 is greedy."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        super().__init__(Sampler(temperature, top_k, top_p, seed))

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]:
        """Sampling settings that cannot work, found before anything is trained."""
        t, k, p = node.get("temperature"), node.get("top_k"), node.get("top_p")
        problems = []
        if isinstance(t, (int, float)) and t < 0:
            problems.append(f"temperature={t} is not allowed: a number >= 0 (0 is greedy)")
        if isinstance(k, int) and k < 0:
            problems.append(f"top_k={k} is not allowed: an integer >= 0 or null (0 or null: no limit)")
        if isinstance(p, (int, float)) and not 0 < p <= 1:
            problems.append(f"top_p={p} is not allowed: a number in (0, 1] or null")
        return problems
