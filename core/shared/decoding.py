"""Pieces every decoder plugin builds on: logit filtering, a seeded sampler, and the
token-by-token loop over block states (``StepDecoder``).

Prompts of different lengths need no padding: all rows are prefilled up to the
shortest prompt, then advanced one position per step; a row still inside its
prompt is fed its next prompt token instead of the chosen one. Every row thus
sees exactly its own tokens, for any kind of block state.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..interfaces import ROW_STATE, STATEFUL, Quantizer, capabilities_of
from .losses import prompt_response_batch, token_logprobs

if TYPE_CHECKING:
    from ..model import LanguageModel

log = logging.getLogger(__name__)


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


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping
MAX_TEMPERATURE = 100.0  # far past uniform; a bound so that nan and inf are refused


class Sampler:
    """Chooses tokens from logits: argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted by top_k / top_p. ``seed`` makes the draws
    repeatable; ``reset()`` starts again from it."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if not 0 <= temperature <= MAX_TEMPERATURE:  # also refuses nan
            raise ValueError(f"decoder.temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"decoder.top_p must be in (0, 1], got {top_p}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"decoder.top_k must be a whole number >= 1, got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"decoder.seed must be a whole number in [0, 2**63 - 1], got {seed!r}")
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
        # shifted so the largest logit is 0 first: a tiny temperature then sends the others
        # to -inf (a one-hot on the argmax), never inf - inf = nan
        shifted = logits - logits.amax(-1, keepdim=True)
        return filter_logits(shifted / self.temperature, self.top_k, self.top_p).softmax(-1)

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
    def generate(self, model: LanguageModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
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

    def init_states(self, model: LanguageModel, batch_size: int, max_len: int, device) -> list:
        return model.init_states(batch_size, max_len, device=device)

    def step(self, model: nn.Module, tokens: torch.Tensor, states: list) -> torch.Tensor:
        """tokens (B, 1) -> next-token logits (B, V), advancing the states."""
        return model(tokens, states=states).logits[:, -1]


class StaticStates:
    """Fixed-shape decode states (``init_states(..., static=True)``, blocks with
    ``static_state``) kept between calls -- reset, not reallocated, so that a compiled
    function replays on the addresses it was captured with -- and the functions compiled
    over them (``torch.compile(fullgraph=True)``; with ``mode="reduce-overhead"`` a CUDA
    graph on a GPU). ``decoder=static`` compiles its one-token step this way, Medusa and
    speculative decoding (``compile: true``) their verify forwards.
    ``compile_s``: seconds spent in first calls (compiling)."""

    def __init__(self, compile: bool = True, mode: str | None = "reduce-overhead", backend: str = "inductor"):
        self.compile_enabled, self.mode, self.backend = compile, mode, backend
        self._states: dict[tuple, list] = {}  # (model id, batch size, device) -> states
        self.compile_s = 0.0

    def get(self, model: LanguageModel, batch_size: int, device) -> list:
        """The states of ``model`` for ``batch_size`` rows, empty (allocated on first use)."""
        key = (id(model), batch_size, str(device))
        states = self._states.get(key)
        if states is None:
            states = model.init_states(batch_size, model.max_seq_len, device=device, static=True)
            if self.compile_enabled:
                for s in states:  # fixed addresses: what CUDA graphs replay on
                    for t in (vars(s).values() if s is not None else ()):
                        if isinstance(t, torch.Tensor):
                            torch._dynamo.mark_static_address(t)
            self._states[key] = states
        else:
            for s in states:
                if s is not None:
                    s.reset()
        return states

    def compile(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``fn`` compiled (or ``fn`` itself with compile false); the outputs are cloned,
        since CUDA graphs reuse their output buffers at the next replay."""
        if not self.compile_enabled:
            return fn
        kw: dict[str, Any] = {"mode": self.mode} if self.backend == "inductor" and self.mode else {}
        compiled: list = []  # made at the first call

        def call(*args: Any) -> Any:
            t0, first = time.perf_counter(), not compiled
            if first:
                compiled.append(torch.compile(fn, fullgraph=True, backend=self.backend, **kw))
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                               compiled[0](*args))
            if first:
                self.compile_s += time.perf_counter() - t0
                log.info("compiled %s in %.1f s (backend %s, mode %s)", name, time.perf_counter() - t0, self.backend,
                         kw.get("mode"))
            return out

        return call


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


@torch.no_grad()
def scored_rollout(model: nn.Module, ref: nn.Module, decoder, tokenizer, reward, batch: dict, *,
                   repeat: int, max_new_tokens: int, seed: int | None) -> dict:
    """``sample_responses``, each response scored by ``reward(prompt text, response text,
    answer)``: the rows a policy-gradient loss reads -- ``sequences`` (N, T) prompt +
    response, ``response_labels`` (the response tokens only), ``ref_logp`` (N, T - 1) the
    frozen ``ref``'s token log-probabilities, ``rewards`` (N,) and ``response_lengths`` (N,),
    N = prompts x ``repeat`` (consecutive rows per prompt)."""
    prompts, responses, answers = sample_responses(model, decoder, batch, eos_id=tokenizer.eos_id,
                                                   max_new_tokens=max_new_tokens, repeat=repeat, seed=seed)
    rewards = torch.tensor([reward(tokenizer.decode(p), tokenizer.decode(r), a)
                            for p, r, a in zip(prompts, responses, answers)], dtype=torch.float32)
    device = batch["prompt_ids"].device
    ids, labels = prompt_response_batch(prompts, responses, tokenizer.pad_id, device)
    ref_logp, _ = token_logprobs(ref.to(device)(ids).logits, labels)
    return {"sequences": ids, "response_labels": labels, "ref_logp": ref_logp, "rewards": rewards.to(device),
            "response_lengths": torch.tensor([len(r) for r in responses], dtype=torch.float32)}


def logits_of(model: nn.Module, ids: torch.Tensor, states: list) -> torch.Tensor:
    """(T, V) float logits of the one row ``ids`` (1, T), advancing ``states``."""
    out = model(ids, states=states)
    return (out if isinstance(out, torch.Tensor) else out.logits)[0].float()  # (T, V)


class Stream:
    """A model, its decode state and the tokens the state has consumed, with rollback.

    With ``static`` (a ``StaticStates``) the states are its fixed-shape ones and feeds of
    at most ``compiled_upto`` tokens go through ``compiled`` (``static.compile`` of a
    function like ``logits_of``); longer feeds -- the prompt -- run eagerly."""

    def __init__(self, model: LanguageModel, max_len: int, device, static: StaticStates | None = None,
                 compiled: Callable[..., torch.Tensor] | None = None, compiled_upto: int = 0):
        self.model, self.seen = model, []  # type: tuple[LanguageModel, list[int]]
        self.states = static.get(model, 1, device) if static else model.init_states(1, max_len, device=device)
        self.device = device
        self.rewindable = all(s is None or hasattr(s, "rewind") for s in self.states)
        self._saved: tuple[list | None, int] | None = None
        self.compiled, self.compiled_upto = compiled, compiled_upto

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Consume ``tokens``; (len(tokens), V) logits predicting the token after each."""
        self.seen += tokens
        fn = self.compiled if self.compiled is not None and len(tokens) <= self.compiled_upto else logits_of
        return fn(self.model, torch.tensor([tokens], device=self.device), self.states)

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
        assert self._saved is not None, "rollback() before mark()"
        saved_states, saved_len = self._saved
        refeed = self.seen[saved_len:keep]
        self.states, self.seen = copy.deepcopy(saved_states or []), self.seen[:saved_len]
        if refeed:
            self.feed(refeed)


def one_at_a_time(decode_one, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], int]:
    """``decode_one(prompt) -> (tokens, steps)`` on each prompt in turn: (outputs, steps in all).
    Drafting decoders fall back to it where a batch cannot decode together."""
    outs, steps = [], 0
    for prompt in prompts:
        out, n = decode_one(list(prompt))
        outs.append(out)
        steps += n
    return outs, steps


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """(n, n) bool tree mask: node i sees itself and its ancestors (``parents[i] < i``; -1
    for a node without a parent) -- what ``state.tree`` takes (TREE_MASK)."""
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def has_rows(model: nn.Module) -> bool:
    """Whether every block's decode state can hold rows at independent positions (ROW_STATE)."""
    blocks = getattr(model, "blocks", None)
    return blocks is not None and all(ROW_STATE in capabilities_of(b) for b in blocks)


class RowStreams:
    """The batched ``Stream``: several sequences decoded together, row b its own sequence
    ``seen[b]`` at its own position (``init_states(rows=True)``), with per-row rollback --
    what batched speculative decoding needs, where rows accept different numbers of tokens.

    States that have ``rewind`` forget each row's dropped tokens (``rewind(counts)`` with
    one count per row). For the others (recurrent states cannot forget), tokens fed after
    ``mark()`` go one at a time and a copy of those states is kept after each, so that
    ``rollback`` puts each row's copy back (``put``).
    """

    def __init__(self, model: LanguageModel, prefixes: Sequence[Sequence[int]], max_len: int, device):
        self.model, self.device = model, device
        self.states = model.init_states(len(prefixes), max_len, device=device, rows=True)
        self.seen = [list(p) for p in prefixes]
        self.prefix_hidden: list[torch.Tensor | None] = []  # (n, D) final hidden states of each prefix
        self.hidden: torch.Tensor | None = None  # (B, T, D) of the last feed, where the model gives them
        for row, prefix in enumerate(self.seen):
            hidden = None
            if prefix:  # prefill alone (prompts differ in length), then move into the row
                single = model.init_states(1, len(prefix), device=device)
                hidden = getattr(model(torch.tensor([prefix], device=device), states=single), "hidden", None)
                for state, one in zip(self.states, single):
                    if state is not None:
                        state.put(row, one)
            self.prefix_hidden.append(None if hidden is None else hidden[0])
        self.copied = [i for i, s in enumerate(self.states) if s is not None and not hasattr(s, "rewind")]
        self._marked: list[int] | None = None
        self._copies: list[list] = []  # _copies[j]: the copied states j tokens after the mark

    def mark(self) -> None:
        """Remember this point: ``rollback`` may keep any count from here on."""
        self._marked = [len(s) for s in self.seen]
        self._copies = [self._copy()] if self.copied else []

    def _copy(self) -> list:
        return [copy.deepcopy(self.states[i]) for i in self.copied]

    def feed(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Row b consumes ``tokens[b]`` (the same count T for every row): (B, T, V) float logits."""
        ids = torch.tensor([list(t) for t in tokens], device=self.device)
        for seen, t in zip(self.seen, tokens):
            seen += t
        if not (self.copied and self._marked is not None):
            outs = [self.model(ids, states=self.states)]
        else:
            outs = []
            for i in range(ids.shape[1]):  # one token at a time, a copy after each
                outs.append(self.model(ids[:, i:i + 1], states=self.states))
                self._copies.append(self._copy())
        hidden = [o.hidden for o in outs if not isinstance(o, torch.Tensor) and o.hidden is not None]
        self.hidden = torch.cat(hidden, 1) if len(hidden) == len(outs) else None
        return torch.cat([(o if isinstance(o, torch.Tensor) else o.logits).float() for o in outs], 1)

    def rollback(self, keep: Sequence[int]) -> None:
        """Row b keeps its first ``keep[b]`` tokens (at least what it held at ``mark``)."""
        drop = [len(s) - k for s, k in zip(self.seen, keep)]
        for i, state in enumerate(self.states):
            if state is not None and i not in self.copied and any(drop):
                state.rewind(drop)
        for row, (n, k) in enumerate(zip(drop, keep)):
            if n > 0 and self.copied:
                assert self._marked is not None, "rollback() before mark()"
                saved = self._copies[k - self._marked[row]]
                for j, i in enumerate(self.copied):
                    self.states[i].put(row, saved[j], row)
            del self.seen[row][k:]
        self._marked, self._copies = None, []

    def select(self, rows: Sequence[int]) -> None:
        """Keep only rows ``rows`` (finished sequences leave the batch)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for state in self.states:
            if state is not None:
                state.reorder(index)
        self.seen = [list(self.seen[r]) for r in rows]  # repeated rows get their own lists

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


def quantized(model: Any, node: Any, run_dir: Any, *, reuse: bool, save: bool) -> Any:
    """``model`` quantized by the ``quantize`` config node (llmzoo-generate, -serve): with
    ``reuse``, the quantized weights stored in the run folder are loaded when there; with
    ``save``, they are written there."""
    import sys
    from pathlib import Path

    from hydra.utils import instantiate

    quantizer: Quantizer = instantiate(node, _convert_="all")
    path = Path(run_dir) / f"model-{quantizer.name}.safetensors"
    if path.exists() and reuse:
        print(f"[loading quantized weights from {path}]", file=sys.stderr)
        return quantizer.load(model, path)
    model = quantizer(model)
    if save:
        quantizer.save(model, path)
        print(f"[quantized weights saved to {path}]", file=sys.stderr)
    return model
