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

import logging
import time

import torch
from torch import nn

from llmzoo.decoding import Sampler, StepDecoder
from llmzoo.interfaces import STATEFUL, STATIC_STATE

log = logging.getLogger(__name__)


def state_tensors(states: list) -> list[torch.Tensor]:
    return [t for s in states if s is not None for t in vars(s).values() if isinstance(t, torch.Tensor)]


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
        self._states: dict[tuple, list] = {}  # (model id, batch size, device) -> states kept across calls
        self._step = None

    def init_states(self, model: nn.Module, batch_size: int, max_len: int, device) -> list:
        key = (id(model), batch_size, str(device))
        states = self._states.get(key)
        if states is None:
            states = model.init_states(batch_size, model.max_seq_len, device=device, static=True)
            if self.compile:
                for t in state_tensors(states):  # fixed addresses: what CUDA graphs replay on
                    torch._dynamo.mark_static_address(t)
            self._states[key] = states
        else:
            for s in states:
                if s is not None:
                    s.reset()
        return states

    @staticmethod
    def decode_step(model: nn.Module, tokens: torch.Tensor, states: list) -> torch.Tensor:
        return model(tokens, states=states).logits[:, -1]

    def step(self, model: nn.Module, tokens: torch.Tensor, states: list) -> torch.Tensor:
        if not self.compile:
            return self.decode_step(model, tokens, states)
        if self._step is None:
            kw = {"mode": self.mode} if self.backend == "inductor" and self.mode else {}
            self._step = torch.compile(self.decode_step, fullgraph=True, backend=self.backend, **kw)
            log.info("compiling the decode step (backend %s, mode %s)", self.backend, kw.get("mode"))
            t0 = time.perf_counter()
            logits = self._step(model, tokens, states).clone()
            self.stats["compile_s"] = time.perf_counter() - t0
            return logits
        # CUDA graphs reuse their output buffer: copy the logits out before the next replay.
        return self._step(model, tokens, states).clone()
