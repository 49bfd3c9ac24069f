"""Speculative decoding (``decoder=speculative``; Leviathan et al. 2023, Chen et al. 2023).

A cheap draft model proposes ``k`` tokens one by one; the target model scores all of
them in one forward; tokens are accepted left to right, and the first rejected one is
replaced by a draw from the corrected distribution, so the output follows the
target's distribution exactly:

    accept draft token x with probability min(1, p(x) / q(x))
    on rejection draw from norm(max(0, p - q));  after k acceptances draw from p

p and q are the target's and the draft's (temperature / top-k / top-p filtered)
distributions; with temperature 0 both are one-hot and the output is the target's
greedy output token for token. Each step yields between 1 and k + 1 tokens;
``stats["accepted_per_step"]`` is their mean.

The draft (``draft:``) is another run (a run folder or ``.ckpt`` path) with the same
tokenizer, or -- with ``draft_layers: n`` -- the target's own first n blocks with its
final norm and head (early exit, no second model to train).

Rows of a batch are decoded one after another (each accepts a different number of
tokens). Rolling the states back after a rejection uses ``rewind`` where every block
has a KV cache; recurrent states (Mamba) are restored from a copy taken before the
step and fed the accepted tokens again.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from llmzoo.decoding import Sampler, check_prompts, finish
from llmzoo.interfaces import STATEFUL


class EarlyExit(nn.Module):
    """The first ``n_layers`` blocks of ``model`` with its final norm and head (shared weights)."""

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        if not 0 < n_layers < len(model.blocks):
            raise ValueError(f"decoder.draft_layers={n_layers} must be between 1 and model.n_layers - 1 = "
                             f"{len(model.blocks) - 1}")
        self.target, self.n_layers = [model], n_layers  # a list: not a submodule, nothing copied
        self.max_seq_len = model.max_seq_len

    def parameters(self, recurse: bool = True):
        return self.target[0].parameters(recurse)

    def init_states(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> list:
        return self.target[0].init_states(batch_size, max_len, device=device, dtype=dtype)[: self.n_layers]

    def forward(self, input_ids: torch.Tensor, *, states: list | None = None):
        m = self.target[0]
        x = m.embedding(input_ids)
        for i, block in enumerate(m.blocks[: self.n_layers]):
            x = block(x, state=None if states is None else states[i])
        return m.head(m.norm(x))


def _logits(model: nn.Module, ids: torch.Tensor, states: list) -> torch.Tensor:
    out = model(ids, states=states)
    return (out if isinstance(out, torch.Tensor) else out.logits)[0].float()  # (T, V)


class Stream:
    """A model, its decode state and the tokens the state has consumed, with rollback."""

    def __init__(self, model: nn.Module, max_len: int, device):
        self.model, self.seen = model, []
        self.states = model.init_states(1, max_len, device=device)
        self.device = device
        self.rewindable = all(s is None or hasattr(s, "rewind") for s in self.states)
        self._saved: tuple[list, int] | None = None

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Consume ``tokens``; (len(tokens), V) logits predicting the token after each."""
        self.seen += tokens
        return _logits(self.model, torch.tensor([tokens], device=self.device), self.states)

    def mark(self) -> None:
        """Remember this point to roll back to (a copy of the states unless they rewind)."""
        self._saved = (None if self.rewindable else copy.deepcopy(self.states), len(self.seen))

    def rollback(self, keep: int) -> None:
        """Keep the first ``keep`` consumed tokens (keep >= the marked length)."""
        drop = len(self.seen) - keep
        if drop <= 0:
            return
        if self.rewindable:
            for s in self.states:
                if s is not None:
                    s.rewind(drop)
            del self.seen[keep:]
            return
        saved_states, saved_len = self._saved
        refeed = self.seen[saved_len:keep]
        self.states, self.seen = copy.deepcopy(saved_states), self.seen[:saved_len]
        if refeed:
            self.feed(refeed)


def accept(sampler: Sampler, proposals: list[int], qs: list[torch.Tensor], ps: torch.Tensor, device) -> tuple[int, int]:
    """Speculative acceptance of drafted ``proposals`` (their draft distributions ``qs``)
    against the target's distributions ``ps`` (len(proposals) + 1 rows): (how many are
    accepted left to right, the token that follows them -- the target's choice after the
    last accepted one, or on rejection a draw from the corrected residual)."""
    n = 0
    while n < len(proposals):
        x, p, q = proposals[n], ps[n], qs[n]
        ok = bool(p[x] > 0) if sampler.greedy else sampler.uniform(device) * float(q[x]) < float(p[x])
        if not ok:
            break
        n += 1
    if n < len(proposals):
        residual = (ps[n] - qs[n]).clamp(min=0)
        last = residual if residual.sum() > 0 else ps[n]
    else:
        last = ps[n]
    return n, int(last.argmax()) if sampler.greedy else int(sampler.draw(last[None] / last.sum()))


def load_draft(path: str) -> nn.Module:
    from llmzoo.api import load_run

    return load_run(path).model


class Speculative:
    """``k`` draft tokens per step; ``draft`` (run folder / checkpoint / model) or ``draft_layers``."""

    requires = frozenset({STATEFUL})

    def __init__(self, k: int = 4, draft: str | nn.Module | None = None, draft_layers: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if k < 1:
            raise ValueError(f"decoder.k must be >= 1, got {k}")
        if (draft is None) == (draft_layers is None):
            raise ValueError("decoder=speculative needs exactly one of decoder.draft=<run folder or .ckpt> "
                             "and decoder.draft_layers=<n>")
        self.k, self.draft_layers = k, draft_layers
        self.sampler = Sampler(temperature, top_k, top_p, seed)
        # a model object (Python API) or a path loaded on first use
        self.draft, self.draft_path = (draft, None) if isinstance(draft, nn.Module) else (None, draft)
        self.stats: dict[str, float] = {}

    def setup(self, run) -> None:
        if self.draft_path is not None and self.draft is None:
            self.draft = load_draft(self.draft_path).to(next(run.model.parameters()).device).eval()

    def draft_for(self, model: nn.Module) -> nn.Module:
        if self.draft_layers is not None:
            return EarlyExit(model, self.draft_layers)
        if self.draft is None:
            self.draft = load_draft(self.draft_path).to(next(model.parameters()).device).eval()
        if self.draft.vocab_size != model.vocab_size:
            raise ValueError(f"draft vocabulary {self.draft.vocab_size} != target vocabulary {model.vocab_size}: "
                             "the draft must use the same tokenizer")
        return self.draft

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        check_prompts(prompts)
        self.sampler.reset()
        draft = self.draft_for(model)
        outs, steps, produced = [], 0, 0
        for prompt in prompts:
            out, n_steps = self._one(model, draft, list(prompt), max_new_tokens, eos_id)
            outs.append(out)
            steps, produced = steps + n_steps, produced + len(out)
        self.stats = {"accepted_per_step": produced / max(steps, 1), "steps": steps}
        return outs

    def _one(self, model, draft, prompt: list[int], max_new_tokens: int, eos_id: int | None):
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, len(prompt) + max_new_tokens + self.k + 1)
        target, small = Stream(model, max_len, device), Stream(draft, max_len, device)
        seq = list(prompt)
        if len(seq) > 1:  # invariant: the target has consumed all of seq but its last token
            target.feed(seq[:-1])
        out, steps, done = [], 0, False
        while not done:
            k = min(self.k, max_len - len(seq))  # room left in the states
            # 1. the draft proposes k tokens
            small.mark()
            q_logits = small.feed(seq[len(small.seen):])[-1:]
            proposals, qs = [], []
            for i in range(k):
                q = self.sampler.probs(q_logits)
                proposals.append(int(self.sampler.draw(q)) if not self.sampler.greedy else int(q.argmax()))
                qs.append(q[0])
                if i < k - 1:
                    q_logits = small.feed(proposals[-1:])
            # 2. the target scores them all at once: p_1 .. p_{k+1}
            target.mark()
            ps = self.sampler.probs(target.feed([seq[-1]] + proposals))
            # 3. accept left to right; replace the first rejection
            n, extra = accept(self.sampler, proposals, qs, ps, device)
            new = proposals[:n] + [extra]
            steps += 1
            out, done = finish(out + new, max_new_tokens, eos_id)
            seq += new
            done = done or len(seq) >= max_len
            # 4. roll both states back to what was accepted
            target.rollback(len(seq) - 1)
            small.rollback(min(len(small.seen), len(seq) - 1))
        return out, steps
