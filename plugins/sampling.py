"""Decoders that draw one token per step using the blocks' decode-time state:
``decoder=greedy`` (argmax) and ``decoder=sample`` (temperature, top-k, top-p, seed).

Prompts of different lengths need no padding: all rows are prefilled up to the
shortest prompt, then advanced one position per step; a row still inside its
prompt is fed its next prompt token instead of the sampled one. Every row thus
sees exactly its own tokens, for any kind of block state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llmzoo.interfaces import STATEFUL


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose
    probability reaches top_p. logits: (B, V)."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token if the tokens ranked above it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Greedy:
    """Always the most likely next token."""

    requires = frozenset({STATEFUL})

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (prepend bos to an empty prompt)")
        device = next(model.parameters()).device
        lens = [len(p) for p in prompts]
        B, total = len(prompts), max(lens) + max_new_tokens
        states = model.init_states(B, total, device=device)
        prompt = torch.full((B, max(lens)), 0, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        in_prompt = torch.tensor(lens, device=device)[:, None] > torch.arange(max(lens), device=device)

        logits = model(prompt[:, : min(lens)], states=states).logits[:, -1]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for pos in range(min(lens), total):
            nxt = self.choose(logits.float())
            if pos < max(lens):  # rows still reading their prompt take the prompt token
                nxt = torch.where(in_prompt[:, pos], prompt[:, pos], nxt)
            for i in range(B):
                if pos >= lens[i] and not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = len(out[i]) >= max_new_tokens or (eos_id is not None and out[i][-1] == eos_id)
            if all(done) or pos == total - 1:
                break
            logits = model(nxt[:, None], states=states).logits[:, -1]
        return out


class Sample(Greedy):
    """Draws from softmax(logits / temperature) restricted by top_k / top_p.
    ``seed`` makes the draws repeatable; temperature 0 is greedy."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"decoder.temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"decoder.top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.generator: torch.Generator | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)
        if self.generator is None or self.generator.device != probs.device:
            self.generator = torch.Generator(probs.device)
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def generate(self, model, prompts, *, max_new_tokens, eos_id=None):
        self.generator = None  # each call starts again from the seed
        return super().generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id)
