"""Static-cache decoding (``decoder=static``): greedy or sampled decoding whose
one-token step is compiled once with ``torch.compile(fullgraph=True)`` -- with
``mode="reduce-overhead"`` that step is captured as a CUDA graph on a GPU.

What makes the step compile once:
  * every block state is static (``init_states(..., static=True)``): tensors of fixed
    shape, allocated once for ``model.max_seq_len`` tokens, updated in place, with the
    position a tensor -- the step is the same graph at every position;
  * the states are kept between calls (reset, not reallocated), so their addresses
    stay those the graph was captured with;
  * blocks keep data-dependent shapes out of the step (MoE's ``gather`` backend).
The prompt is prefilled eagerly (its length varies); only the step is compiled.
Dense, MoE, Mamba, Mamba-2 and hybrid blocks all declare ``static_state``.
"""

from __future__ import annotations

from torch import nn

from llmzoo.shared.decoding import Sampler, StaticStates, StepDecoder
from llmzoo.interfaces import STATEFUL, STATIC_STATE


class StaticCache(StepDecoder):
    """``temperature`` 0 (default) is greedy; otherwise as ``decoder=sample``.
    ``compile``: false runs the same static step eagerly. ``mode`` and ``backend`` go
    to ``torch.compile``."""

    requires = frozenset({STATEFUL, STATIC_STATE})

    def __init__(self, compile: bool = True, mode: str | None = "reduce-overhead", backend: str = "inductor",
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        super().__init__(Sampler(temperature, top_k, top_p, seed))
        self.compile, self.mode, self.backend = compile, mode, backend
        self.static = StaticStates(compile, mode, backend)
        self._step = self.static.compile(self.decode_step, "the decode step")

    def init_states(self, model: nn.Module, batch_size: int, max_len: int, device) -> list:
        return self.static.get(model, batch_size, device)

    @staticmethod
    def decode_step(model: nn.Module, tokens, states: list):
        return model(tokens, states=states).logits[:, -1]

    def step(self, model: nn.Module, tokens, states: list):
        logits = self._step(model, tokens, states)
        if self.static.compile_s:
            self.stats["compile_s"] = self.static.compile_s
        return logits
