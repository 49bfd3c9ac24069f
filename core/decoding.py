"""Pieces every decoder plugin builds on: logit filtering, a seeded sampler, and the
token-by-token loop over block states (``StepDecoder``).

Prompts of different lengths need no padding: all rows are prefilled up to the
shortest prompt, then advanced one position per step; a row still inside its
prompt is fed its next prompt token instead of the chosen one. Every row thus
sees exactly its own tokens, for any kind of block state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .interfaces import STATEFUL


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


class Sampler:
    """Chooses tokens from logits: argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted by top_k / top_p. ``seed`` makes the draws
    repeatable; ``reset()`` starts again from it."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"decoder.temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"decoder.top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def reset(self) -> None:
        self.generator = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> the distribution tokens are drawn from (one-hot when greedy)."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, V) probabilities -> (B,) tokens."""
        if self.generator is None or self.generator.device != probs.device:
            self.generator = torch.Generator(probs.device)
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def uniform(self, device) -> float:
        """One U(0, 1) draw from the same generator (rejection sampling)."""
        if self.generator is None:
            self.draw(torch.ones(1, 1, device=device))
        return float(torch.rand((), generator=self.generator, device=device))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        return self.draw(self.probs(logits))


class StepDecoder:
    """One token per forward, using the blocks' decode-time states. Subclasses may
    replace ``init_states`` and ``step`` (e.g. with fixed-shape states and a compiled step)."""

    requires = frozenset({STATEFUL})

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.stats: dict[str, float] = {}

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        check_prompts(prompts)
        self.sampler.reset()  # each call starts again from the seed
        device = next(model.parameters()).device
        lens = [len(p) for p in prompts]
        B, total = len(prompts), max(lens) + max_new_tokens
        states = self.init_states(model, B, total, device)
        prompt = torch.full((B, max(lens)), 0, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        in_prompt = torch.tensor(lens, device=device)[:, None] > torch.arange(max(lens), device=device)

        logits = model(prompt[:, : min(lens)], states=states).logits[:, -1]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for pos in range(min(lens), total):
            nxt = self.sampler(logits.float())
            if pos < max(lens):  # rows still reading their prompt take the prompt token
                nxt = torch.where(in_prompt[:, pos], prompt[:, pos], nxt)
            for i in range(B):
                if pos >= lens[i] and not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = len(out[i]) >= max_new_tokens or (eos_id is not None and out[i][-1] == eos_id)
            if all(done) or pos == total - 1:
                break
            logits = self.step(model, nxt[:, None], states)
        return out

    def init_states(self, model: nn.Module, batch_size: int, max_len: int, device) -> list:
        return model.init_states(batch_size, max_len, device=device)

    def step(self, model: nn.Module, tokens: torch.Tensor, states: list) -> torch.Tensor:
        """tokens (B, 1) -> next-token logits (B, V), advancing the states."""
        return model(tokens, states=states).logits[:, -1]


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``t`` (dim 0), for ``DecodeState.reorder``: written in place (same
    tensor and address, as static states need) when the row count stays the same."""
    picked = t.index_select(0, index.to(t.device))
    if picked.shape == t.shape:
        return t.copy_(picked)
    return picked


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (prepend bos to an empty prompt)")


def finish(tokens: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Cut ``tokens`` at max_new_tokens and after the first eos; True when generation is over."""
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
        return tokens[:max_new_tokens], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.no_grad()
def sample_responses(model: nn.Module, decoder, batch: dict, *, eos_id: int, max_new_tokens: int,
                     repeat: int = 1, seed: int | None = None) -> tuple[list[list[int]], list[list[int]], list]:
    """RL rollouts: each prompt of a ``data=prompts`` batch (left-padded ``prompt_ids`` and
    ``prompt_lens``) ``repeat`` times in a row, answered by ``decoder`` in eval mode.
    ``seed`` reseeds a decoder that has a ``sampler``. Returns (prompts, responses, answers)."""
    ids, lens = batch["prompt_ids"], batch["prompt_lens"].tolist()
    prompts = [ids[i, ids.shape[1] - n:].tolist() for i, n in enumerate(lens) for _ in range(repeat)]
    answers = [a for a in batch.get("answers", [None] * len(lens)) for _ in range(repeat)]
    sampler = getattr(decoder, "sampler", None)
    if seed is not None and sampler is not None:
        sampler.seed = seed
    was_training = model.training
    model.eval()
    try:
        responses = decoder.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id)
    finally:
        model.train(was_training)
    return prompts, responses, answers
