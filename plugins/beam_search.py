"""Beam search (``decoder=beam``): keep the ``width`` most likely continuations of each
prompt, one token per step over the blocks' decode-time states.

Each step scores every (beam, next token) pair by its summed log-probability, keeps the
best ``width`` that have not ended, and moves the states to them with
``DecodeState.reorder(index)`` -- a beam that two survivors extend is duplicated, one
that none extends is dropped. A candidate ending in eos (or at ``max_new_tokens``) is
finished when it ranks among the best ``width``; the search stops once ``width`` are finished, and the one with the best
``log p / length ** length_penalty`` is returned. At width 1 this is greedy decoding.
Prompts are searched one after another, each as a batch of ``width`` rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llmzoo.shared.decoding import check_prompts
from llmzoo.interfaces import STATEFUL


class BeamSearch:
    requires = frozenset({STATEFUL})

    def __init__(self, width: int = 4, length_penalty: float = 1.0):
        if width < 1:
            raise ValueError(f"decoder.width must be >= 1, got {width}")
        self.width, self.length_penalty = width, length_penalty
        self.stats: dict[str, float] = {}

    @staticmethod
    def check(node, cfg) -> list[str]:
        w = node.get("width")
        return [] if isinstance(w, int) and w >= 1 else [f"width={w!r} is not allowed: an integer >= 1"]

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        check_prompts(prompts)
        return [self.search(model, list(p), max_new_tokens, eos_id) for p in prompts]

    def search(self, model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
        if max_new_tokens <= 0:
            return []
        device = next(model.parameters()).device
        states = model.init_states(1, len(prompt) + max_new_tokens, device=device)
        logits = model(torch.tensor([prompt], device=device), states=states).logits[:, -1]
        beams: list[list[int]] = [[]]
        scores = torch.zeros(1, device=device)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_new_tokens):
            cand = scores[:, None] + logits.float().log_softmax(-1)  # (beams, V)
            top = cand.flatten().topk(min(2 * self.width, cand.numel()))
            keep_rows, keep_tokens, keep_scores, next_beams = [], [], [], []
            for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                row, token = divmod(flat, cand.shape[1])
                seq = beams[row] + [token]
                if token == eos_id or len(seq) == max_new_tokens:
                    if rank < self.width:  # only the best `width` candidates may end the search
                        finished.append((score / len(seq) ** self.length_penalty, seq))
                elif len(next_beams) < self.width:
                    keep_rows.append(row), keep_tokens.append(token), keep_scores.append(score)
                    next_beams.append(seq)
                if len(next_beams) == self.width and len(finished) >= self.width:
                    break
            if len(finished) >= self.width or not next_beams:
                break
            index = torch.tensor(keep_rows, device=device)
            for state in states:  # follow the surviving beams (rows may repeat or drop)
                if state is not None:
                    state.reorder(index)
            beams, scores = next_beams, torch.tensor(keep_scores, device=device)
            logits = model(torch.tensor(keep_tokens, device=device)[:, None], states=states).logits[:, -1]
        if not finished:  # (cannot happen: the last step finishes every candidate)
            finished = [(s / len(b) ** self.length_penalty, b) for s, b in zip(scores.tolist(), beams)]
        return max(finished, key=lambda f: f[0])[1]
