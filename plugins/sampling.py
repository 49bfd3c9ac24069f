"""The plain decoders, one token per step over the blocks' decode-time states
(the loop itself is ``llmzoo.decoding.StepDecoder``):

  decoder=greedy   always the most likely next token
  decoder=sample   softmax(logits / temperature) restricted by top-k / top-p, seeded
"""

from __future__ import annotations

from llmzoo.decoding import Sampler, StepDecoder, filter_logits

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
