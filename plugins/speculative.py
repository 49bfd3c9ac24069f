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

A batch is decoded together when the blocks of target and draft have ``row_state``
(every built-in block does): each row sits at its own position, accepts its own count,
and rolls back alone (``llmzoo.shared.decoding.RowStreams``: per-row ``rewind`` for KV caches,
per-token copies for recurrent states); finished rows leave the batch. Otherwise, and
for a single prompt, rows go one after another: rolling back uses ``rewind`` where every
block has a KV cache, else a copy taken before the step fed the accepted tokens again.

``compile: true`` (KV-cache blocks: dense, MoE; one prompt at a time) decodes over static
KV caches that rewind in place, with the target's verify forward and the draft's step
compiled as ``decoder=static`` compiles its step: one graph per token count (k + 1 for the
target, 1 and 2 for the draft, fewer near ``max_new_tokens``); prompts are prefilled eagerly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llmzoo.shared.decoding import (RowStreams, Sampler, StaticStates, Stream, accept, check_prompts, finish, has_rows,
                                    logits_of, one_at_a_time)
from llmzoo.interfaces import KV_CACHE, STATEFUL, STATIC_STATE


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

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.target[0].blocks[: self.n_layers])

    def init_states(self, batch_size: int, max_len: int, *, device=None, dtype=None, **kwargs) -> list:
        return self.target[0].init_states(batch_size, max_len, device=device, dtype=dtype, **kwargs)[: self.n_layers]

    def forward(self, input_ids: torch.Tensor, *, states: list | None = None):
        m = self.target[0]
        x = m.embedding(input_ids)
        for i, block in enumerate(m.blocks[: self.n_layers]):
            x = block(x, state=None if states is None else states[i])
        return m.head(m.norm(x))


def verify_logits(model: nn.Module, ids: torch.Tensor, states: list) -> torch.Tensor:
    """The target's forward (``compile``: its own function, so its own graphs)."""
    return logits_of(model, ids, states)


def draft_logits(model: nn.Module, ids: torch.Tensor, states: list) -> torch.Tensor:
    """The draft's forward (``compile``: its own function, so its own graphs)."""
    return logits_of(model, ids, states)


def load_draft(path: str) -> nn.Module:
    from llmzoo.api import load_run

    return load_run(path).model


class Speculative:
    """``k`` draft tokens per step; ``draft`` (run folder / checkpoint / model) or ``draft_layers``."""

    requires = frozenset({STATEFUL})

    @staticmethod
    def requires_for(node) -> frozenset[str]:
        """``compile: true`` needs static KV caches that rewind (the target's blocks)."""
        return frozenset({STATEFUL, STATIC_STATE, KV_CACHE}) if node.get("compile") else Speculative.requires

    def __init__(self, k: int = 4, draft: str | nn.Module | None = None, draft_layers: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, compile: bool = False, mode: str | None = "reduce-overhead",
                 backend: str = "inductor"):
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
        self.compile, self._early = compile, {}
        # compile: each model's static states, and one compiled forward for each (own graphs and recompile budget)
        self.static_target = StaticStates(compile, mode, backend)
        self.static_draft = StaticStates(compile, mode, backend)
        self._verify = self.static_target.compile(verify_logits, "the speculative verify forward")
        self._propose = self.static_draft.compile(draft_logits, "the speculative draft step")

    def setup(self, run) -> None:
        if self.draft_path is not None and self.draft is None:
            self.draft = load_draft(self.draft_path).to(next(run.model.parameters()).device).eval()

    def draft_for(self, model: nn.Module) -> nn.Module:
        if self.draft_layers is not None:  # one per model: compiled steps keep its static states
            if id(model) not in self._early:
                self._early[id(model)] = EarlyExit(model, self.draft_layers)
            return self._early[id(model)]
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
        if len(prompts) > 1 and has_rows(model) and has_rows(draft) and not self.compile:
            outs, steps = self._batched(model, draft, [list(p) for p in prompts], max_new_tokens, eos_id)
        else:
            outs, steps = one_at_a_time(lambda p: self._one(model, draft, p, max_new_tokens, eos_id), prompts)
        self.stats = {"accepted_per_step": sum(map(len, outs)) / max(steps, 1), "steps": steps}
        if self.static_target.compile_s or self.static_draft.compile_s:
            self.stats["compile_s"] = self.static_target.compile_s + self.static_draft.compile_s
        return outs

    def _draft_k(self, small, catch_up: list[list[int]], k: int):
        """The draft consumes ``catch_up`` and proposes k tokens per row: (proposals, their
        distributions q), k lists of (B,) tokens and (B, V) probabilities."""
        q_logits = small.feed(catch_up)[:, -1]
        proposals, qs = [], []
        for i in range(k):
            q = self.sampler.probs(q_logits)
            proposals.append(q.argmax(-1) if self.sampler.greedy else self.sampler.draw(q))
            qs.append(q)
            if i < k - 1:
                q_logits = small.feed(proposals[-1][:, None].tolist())[:, -1]
        return torch.stack(proposals, 1).tolist(), torch.stack(qs, 1)

    def _batched(self, model, draft, seqs: list[list[int]], max_new_tokens: int, eos_id: int | None):
        """All rows at once (blocks with row_state): one draft forward per drafted token and
        one target forward per step for the whole batch; each row accepts its own count and
        rolls back alone. A finished row leaves the batch."""
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, max(map(len, seqs)) + max_new_tokens + self.k + 1)
        target = RowStreams(model, [s[:-1] for s in seqs], max_len, device)  # all but the last token
        small = RowStreams(draft, [s[:-1] for s in seqs], max_len, device)
        live, outs, steps = list(range(len(seqs))), [[] for _ in seqs], 0
        while live:
            k = min(self.k, min(max_len - len(seqs[r]) for r in live))  # room left in the states
            small.mark()
            catch_up = [seqs[r][len(seen):] for r, seen in zip(live, small.seen)]  # 1 or 2 tokens, equal
            proposals, qs = self._draft_k(small, catch_up, k)
            target.mark()
            ps = self.sampler.probs(target.feed([[seqs[r][-1]] + p for r, p in zip(live, proposals)]))
            steps += len(live)  # one step of each row
            still = []
            for i, r in enumerate(live):
                n, extra = accept(self.sampler, proposals[i], list(qs[i]), ps[i], device)
                new = proposals[i][:n] + [extra]
                outs[r], done = finish(outs[r] + new, max_new_tokens, eos_id)
                seqs[r] += new
                if not (done or len(seqs[r]) >= max_len):
                    still.append(i)
            # the target keeps all but the last token; the draft one fewer, so that every
            # row feeds the same two tokens next step
            target.rollback([len(seqs[r]) - 1 for r in live])
            small.rollback([len(seqs[r]) - 2 for r in live])
            if len(still) < len(live):
                target.select(still), small.select(still)
                live = [live[i] for i in still]
        return outs, steps

    def _one(self, model, draft, prompt: list[int], max_new_tokens: int, eos_id: int | None):
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, len(prompt) + max_new_tokens + self.k + 1)
        if self.compile:  # static caches; feeds of up to k + 1 (target) and 2 (draft) tokens compiled
            target = Stream(model, max_len, device, self.static_target, self._verify, self.k + 1)
            small = Stream(draft, max_len, device, self.static_draft, self._propose, 2)
            if not (target.rewindable and small.rewindable):
                raise ValueError("decoder.compile=true needs the blocks of the target and the draft to have static "
                                 "KV caches that rewind (dense, MoE)")
        else:
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
