"""Medusa (Cai et al. 2024): K extra heads guess the tokens 2..K+1 ahead from the last
hidden state; a tree of their top guesses is verified in one forward.

``objective=medusa`` trains the heads. Head k (k = 1..K) is a residual SiLU block and
a vocabulary projection; at position t it predicts token t + k + 1 (the model's own
head predicts t + 1). Loss = sum_k decay^k * CE_k, with
  freeze_base: true   Medusa-1 -- the base model runs without gradients, only heads learn
  freeze_base: false  Medusa-2 -- base CE + heads_weight * sum_k decay^k * CE_k, jointly
The heads start from the model's own vocabulary head (their residual block from zero),
as in the paper.

``decoder=medusa`` decodes with them. ``tree`` lists candidate paths: [0, 1] is "the top
guess of head 1, then the second guess of head 2". Each step feeds the last token and
every tree node in one forward with a tree attention mask (a node sees the prefix, its
ancestors and itself), picks the longest path that the model itself agrees with, keeps
that path in the KV cache and drops the rest. Greedy acceptance (temperature 0) gives
exactly the tokens of plain greedy decoding; with temperature > 0 it uses typical
acceptance (a guess is kept when p(guess) > min(epsilon, delta * exp(-entropy(p)))).

Blocks that take tree masks (``tree_mask``: dense attention, MoE) verify the whole tree in
one forward of its nodes. Other blocks (Mamba, Mamba-2, hybrid stacks: a recurrent state
cannot branch) verify it as rows: every root-to-leaf path is one row of a batch over
copies of the state (``reorder``), one forward for all of them; the state of the best
row is kept when it accepted its whole path, else the accepted tokens are fed again to a
copy of the state from before the step. ``verify: auto | tree | rows`` picks (auto: tree
where the blocks can). A batch (blocks with ``row_state``: all built-in ones) is decoded
together by rows verification: every batch row times every path, in one forward per step
(``_batched``); a single prompt uses the tree or rows verification above.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.decoding import (RowStreams, Sampler, StaticStates, ancestor_mask, check_prompts, finish, has_rows,
                                    one_at_a_time)
from llmzoo.interfaces import (IGNORE_INDEX, STATEFUL, STATIC_STATE, TREE_MASK,
                               Batch, Loss, ModelOutput, capabilities_of)
from llmzoo import hookimpl
from llmzoo.config import node_class
from llmzoo.shared.losses import shifted_labels


# ============================================================================ heads and their loss
class MedusaHead(nn.Module):
    """x + silu(W x + b), then a vocabulary projection. (..., D) -> (..., V)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.res = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h + F.silu(self.res(h)))


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of logits[:, t] against labels[:, t + shift]; returns (loss, top-1 accuracy)."""
    target = shifted_labels(labels, shift)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)
    acc = (logits.argmax(-1) == target)[mask].float().mean()
    return ce, acc


class MedusaObjective(nn.Module):
    """Owns the heads (sized by ``setup(model)``); see the module docstring for the loss."""

    needs = frozenset({"input_ids"})

    def __init__(self, n_heads: int = 4, decay: float = 0.8, freeze_base: bool = True, heads_weight: float = 0.2):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"objective.n_heads must be >= 1, got {n_heads}")
        self.n_heads, self.decay, self.freeze_base, self.heads_weight = n_heads, decay, freeze_base, heads_weight
        self.heads = nn.ModuleList()

    reads = frozenset({"hidden", "logits", "aux_loss"})

    @torch.no_grad()
    def setup(self, model: nn.Module, tokenizer=None) -> None:
        if self.freeze_base:  # Medusa-1: only the heads train (the base gets no gradient)
            model.requires_grad_(False)
        if len(self.heads):
            return
        self.heads = nn.ModuleList(MedusaHead(model.dim, model.vocab_size) for _ in range(self.n_heads))
        self.heads.to(model.head.weight.device)
        for h in self.heads:
            h.out.weight.copy_(model.head.weight)
            nn.init.zeros_(h.res.weight), nn.init.zeros_(h.res.bias)

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        labels = batch.get("labels", batch["input_ids"])
        hidden = out.hidden.detach() if self.freeze_base else out.hidden
        loss, metrics = 0.0, {}
        for k, head in enumerate(self.heads, start=1):
            ce, acc = shifted_ce(head(hidden), labels, k + 1)
            loss = loss + self.decay ** k * ce
            metrics[f"medusa{k}_ce"], metrics[f"medusa{k}_top1"] = ce.detach(), acc.detach()
        if not self.freeze_base:
            base, _ = shifted_ce(out.logits, labels, 1)
            metrics["ce"] = base.detach()
            loss = base + self.heads_weight * loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        return Loss(loss, metrics, measure=metrics.get("ce"))


# ============================================================================ the candidate tree
class Tree:
    """Paths sorted by depth. Node 0 is the root (the last accepted token); node i > 0
    has ``parent[i]``, ``depth[i]`` (1 = first head) and ``rank[i]`` (which guess of that head)."""

    def __init__(self, paths: Sequence[Sequence[int]]):
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        self.parent, self.depth, self.rank = [0], [0], [0]
        for p in paths:
            if not p or p[:-1] not in index:
                raise ValueError(f"decoder.tree: path {list(p)} needs its parent {list(p[:-1])} in the tree too")
            index[p] = len(self.parent)
            self.parent.append(index[p[:-1]]), self.depth.append(len(p)), self.rank.append(p[-1])
        n = len(self.parent)
        self.mask = ancestor_mask([-1] + self.parent[1:])
        self.max_depth, self.max_rank = max(self.depth), max(self.rank)
        parents = set(self.parent[1:])
        self.leaves = [i for i in range(1, n) if i not in parents]  # each path of rows verification

    def __len__(self) -> int:
        return len(self.parent)

    def path_to(self, i: int) -> list[int]:
        """Nodes from the root's first child down to i."""
        out = []
        while i:
            out.append(i)
            i = self.parent[i]
        return out[::-1]


# 7 candidates, 4 deep. On a CPU every candidate costs compute, and this tree was the
# fastest of those tried (benchmarks/README.md); on a GPU wider trees are nearly free,
# e.g. [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0],
# [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0, 0]].
DEFAULT_TREE = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


# ============================================================================ decoding
class Medusa:
    """Tree-verified decoding with the heads of a run trained with ``objective=medusa``
    (taken from the run in ``setup``, or given as ``heads``)."""

    requires = frozenset({STATEFUL})  # tree_mask where the blocks have it, else rows verification

    @staticmethod
    def requires_for(node: DictConfig) -> frozenset[str]:
        """``compile: true`` verifies the tree with a compiled forward over static states."""
        return frozenset({STATEFUL, STATIC_STATE, TREE_MASK}) if node.get("compile") else Medusa.requires

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        try:
            Tree(node.get("tree") or DEFAULT_TREE)
        except ValueError as e:
            return [str(e)]
        return []

    def __init__(self, tree: Sequence[Sequence[int]] | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                 heads: nn.Module | None = None, verify: str = "auto", compile: bool = False,
                 mode: str | None = "reduce-overhead", backend: str = "inductor"):
        if verify not in ("auto", "tree", "rows"):
            raise ValueError(f"decoder.verify={verify!r} is not one of ['auto', 'tree', 'rows']")
        if compile and verify == "rows":
            raise ValueError("decoder.compile=true verifies with a tree mask: it needs decoder.verify=auto or tree")
        self.verify, self.compile = verify, compile
        self.static = StaticStates(compile, mode, backend)
        self._tree_step = self.static.compile(self._tree_forward, "the Medusa tree step")
        self.tree = Tree(tree or DEFAULT_TREE)
        self.sampler = Sampler(temperature, top_k, top_p, seed)
        self.epsilon, self.delta = posterior_threshold, posterior_alpha
        self.heads = heads.heads if isinstance(heads, MedusaObjective) else heads
        self.stats: dict[str, float] = {}

    def setup(self, run) -> None:
        objective = getattr(run, "objective", None)
        if not isinstance(objective, MedusaObjective):
            raise ValueError("decoder=medusa needs a run trained with objective=medusa (its heads); "
                             f"this run's objective is {run.cfg.objective.get('_target_')}")
        self.heads = objective.heads

    def _guesses(self, hidden: torch.Tensor, depth: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """hidden (D,) -> (nodes - 1,) the guessed token of every non-root node."""
        logits = torch.stack([h(hidden) for h in self.heads[: self.tree.max_depth]])
        top = logits.topk(self.tree.max_rank + 1, dim=-1).indices  # (depth, rank)
        return top[depth - 1, rank]

    def _accepted(self, probs: torch.Tensor, nodes: torch.Tensor, parent: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """(nodes,) bool: every guess on the path from the root to the node is accepted by
        the model at its parent (greedy: it is the argmax; sampling: typical acceptance)."""
        good = self._good(probs[parent], nodes)  # each guess judged by the distribution at its parent
        good[0] = True  # the root is the token already chosen
        return ~(mask & ~good[None, :]).any(-1)  # all ancestors (and the node) good

    def _good(self, p_parent: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """Whether each guess is accepted by the distribution at its parent (..., V)."""
        p_guess = p_parent.gather(-1, guess[..., None])[..., 0]
        if self.sampler.greedy:
            return p_guess > 0  # p is one-hot on the argmax
        entropy = -(p_parent * p_parent.clamp(min=1e-12).log()).sum(-1)
        return p_guess > torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)

    def _next(self, p: torch.Tensor) -> int:
        return int(p.argmax()) if self.sampler.greedy else int(self.sampler.draw(p[None])[0])

    def _verify_rows(self, model: nn.Module, states: list, nodes: torch.Tensor):
        """Rows verification (see the module docstring): -> (accepted guesses, next token,
        hidden state at the last accepted position); ``states`` advanced past them."""
        tree, device = self.tree, nodes.device
        paths = [[0] + tree.path_to(leaf) for leaf in tree.leaves]
        width = tree.max_depth + 1
        rows = torch.stack([nodes[torch.tensor(p + [p[-1]] * (width - len(p)), device=device)] for p in paths])
        depth = torch.tensor([len(p) - 1 for p in paths], device=device)
        before = copy.deepcopy(states)
        for s in states:
            s.reorder(torch.zeros(len(paths), dtype=torch.long, device=device))
        res = model(rows, states=states)
        probs = self.sampler.probs(res.logits.float().flatten(0, 1)).view(len(paths), width, -1)
        good = self._good(probs[:, :-1], rows[:, 1:]) & (torch.arange(width - 1, device=device) < depth[:, None])
        accepted = good.long().cumprod(-1).sum(-1)  # leading accepted guesses of each row
        r = int(accepted.argmax())  # the longest (first on ties)
        a = int(accepted[r])
        if a == width - 1:  # the whole row was accepted: its state is the one to go on from
            for s in states:
                s.reorder(torch.tensor([r], device=device))
            self._refed[0] += 1
        else:  # feed the accepted tokens again, from the state before the step
            states[:] = before
            model(rows[r:r + 1, :a + 1], states=states)
            self._refed[1] += 1
        return rows[r, 1:a + 1].tolist(), self._next(probs[r, a]), res.hidden[r, a]

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        check_prompts(prompts)
        if self.heads is None:
            raise ValueError("decoder=medusa has no heads: load a run trained with objective=medusa")
        if len(self.heads) < self.tree.max_depth:
            raise ValueError(f"decoder.tree is {self.tree.max_depth} deep but the run has {len(self.heads)} heads")
        self.sampler.reset()
        self._refed = [0, 0]  # rows verification: steps that kept a row's state, steps that fed again
        fits = max(map(len, prompts)) + max_new_tokens + self.tree.max_depth + 2 <= model.max_seq_len
        if self.compile and TREE_MASK not in capabilities_of(model):
            raise ValueError("decoder.compile=true needs blocks with tree_mask and static_state (dense, MoE)")
        if len(prompts) > 1 and fits and has_rows(model) and not self.compile:
            tree = self.verify == "tree" or (self.verify == "auto" and TREE_MASK in capabilities_of(model))
            batched = self._batched_tree if tree else self._batched
            outs, steps = batched(model, [list(p) for p in prompts], max_new_tokens, eos_id)
        else:
            outs, steps = one_at_a_time(lambda p: self._one(model, p, max_new_tokens, eos_id), prompts)
        produced = sum(map(len, outs))
        self.stats = {"accepted_per_step": (produced - len(prompts)) / max(steps, 1), "steps": steps}
        if any(self._refed):
            self.stats.update(rows_state_kept=self._refed[0], rows_state_refed=self._refed[1])
        if self.static.compile_s:
            self.stats["compile_s"] = self.static.compile_s
        return outs

    def _tree_forward(self, model: nn.Module, token: torch.Tensor, hidden: torch.Tensor, states: list,
                      depth: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One verify step: the heads' guesses from ``hidden`` (D,) under the last token
        ``token`` (1,), and one forward of the tree (``state.tree`` already set) -> (nodes,
        (nodes, V) logits, (nodes, D) hidden states). Fixed shapes: ``compile`` compiles it."""
        nodes = torch.cat([token, self._guesses(hidden, depth[1:], rank[1:])])
        res = model(nodes[None], states=states)
        return nodes, res.logits[0], res.hidden[0]

    def _start(self, model: nn.Module, seqs: list[list[int]], max_new_tokens: int, eos_id: int | None, room: int):
        """Row streams over the prompts and each prompt's first token: (streams, live rows,
        outputs, (B,) last tokens, (B, D) hidden states), finished rows already left."""
        device = next(model.parameters()).device
        streams = RowStreams(model, [s[:-1] for s in seqs], max(map(len, seqs)) + max_new_tokens + room, device)
        logits = streams.feed([s[-1:] for s in seqs])[:, -1]  # the prompts' last tokens
        hidden = streams.hidden[:, -1]
        first = [self._next(p) for p in self.sampler.probs(logits)]
        live, outs = [], [[] for _ in seqs]
        for r, t in enumerate(first):
            outs[r], done = finish([t], max_new_tokens, eos_id)
            if not done:
                live.append(r)
        streams.select(live)
        return streams, live, outs, torch.tensor([first[r] for r in live], device=device), hidden[live]

    def _batch_nodes(self, token: torch.Tensor, hidden: torch.Tensor, t_depth, t_rank) -> torch.Tensor:
        """(B,) last tokens and (B, D) hidden states -> (B, nodes): each row's tree of guesses."""
        logits = torch.stack([h(hidden) for h in self.heads[: self.tree.max_depth]], 1)  # (B, depth, V)
        top = logits.topk(self.tree.max_rank + 1, dim=-1).indices  # (B, depth, rank)
        return torch.cat([token[:, None], top[:, t_depth - 1, t_rank]], 1)

    def _batched_tree(self, model: nn.Module, seqs: list[list[int]], max_new_tokens: int, eos_id: int | None):
        """All rows at once with one tree for every row (blocks with tree_mask and
        row_state): each row's candidate tree in one forward of (B, nodes), each row keeps
        its own accepted path (``keep`` with per-row starts)."""
        tree, device = self.tree, next(model.parameters()).device
        mask, n_nodes = tree.mask.to(device), len(tree)
        depth, parent = torch.tensor(tree.depth, device=device), torch.tensor(tree.parent, device=device)
        t_depth, t_rank = depth[1:], torch.tensor(tree.rank[1:], device=device)
        streams, live, outs, token, hidden = self._start(model, seqs, max_new_tokens, eos_id, n_nodes + 1)
        steps = 0
        while live:
            nodes = self._batch_nodes(token, hidden, t_depth, t_rank)
            starts = [len(s) for s in streams.seen]
            for state in streams.states:
                state.tree = mask
            res = model(nodes, states=streams.states)
            probs = self.sampler.probs(res.logits.float().flatten(0, 1)).view(len(live), n_nodes, -1)
            good = self._good(probs[:, parent], nodes)  # each guess judged at its parent
            good[:, 0] = True
            ok = ~(mask[None] & ~good[:, None, :]).any(-1)  # (B, nodes): the whole path accepted
            best = torch.where(ok, depth, -1).argmax(-1).tolist()  # deepest accepted (first on ties)
            keeps = [torch.tensor([0] + tree.path_to(b), device=device) for b in best]
            for state in streams.states:
                state.keep(starts, keeps)
            steps += len(live)
            still, nxt = [], []
            for i, r in enumerate(live):
                kept = nodes[i, keeps[i]].tolist()
                streams.seen[i] += kept
                nxt.append(self._next(probs[i, best[i]]))
                outs[r], done = finish(outs[r] + kept[1:] + [nxt[-1]], max_new_tokens, eos_id)
                if not done:
                    still.append(i)
            hidden = res.hidden[torch.arange(len(live), device=device), torch.tensor(best, device=device)]
            if len(still) < len(live):
                streams.select(still)
                live, hidden = [live[i] for i in still], hidden[still]
            token = torch.tensor([nxt[i] for i in still], device=device)
        return outs, steps

    def _batched(self, model: nn.Module, seqs: list[list[int]], max_new_tokens: int, eos_id: int | None):
        """All rows at once, by rows verification for every block: each batch row becomes
        one row per path of the tree (``RowStreams.select`` with repeats), all verified in
        one forward; each batch row keeps its best path's row, rolled back to what that
        path accepted (per-row ``rewind``, or per-token copies for recurrent states)."""
        tree, device = self.tree, next(model.parameters()).device
        width = tree.max_depth + 1
        paths = [[0] + tree.path_to(leaf) for leaf in tree.leaves]
        cols = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths], device=device)  # (P, width) node ids
        depth = torch.tensor([len(p) - 1 for p in paths], device=device)
        n_paths, t_depth, t_rank = len(paths), torch.tensor(tree.depth[1:], device=device), torch.tensor(tree.rank[1:], device=device)
        streams, live, outs, token, hidden = self._start(model, seqs, max_new_tokens, eos_id, width + 1)
        steps = 0
        while live:
            # guesses of every batch row's heads -> (B, P, width) candidate rows
            nodes = self._batch_nodes(token, hidden, t_depth, t_rank)  # (B, nodes)
            rows = nodes[:, cols].flatten(0, 1)  # (B * P, width)
            streams.select([r for r in range(len(live)) for _ in range(n_paths)])
            streams.mark()
            probs = self.sampler.probs(streams.feed(rows.tolist()).flatten(0, 1)).view(len(rows), width, -1)
            good = self._good(probs[:, :-1], rows[:, 1:]) & (torch.arange(width - 1, device=device) < depth.repeat(len(live))[:, None])
            accepted = good.long().cumprod(-1).sum(-1).view(len(live), n_paths)  # leading accepted guesses
            best = accepted.argmax(-1)  # the longest path of each batch row (first on ties)
            chosen = (torch.arange(len(live), device=device) * n_paths + best).tolist()
            a = accepted.gather(1, best[:, None])[:, 0].tolist()
            seen_at_mark = [len(s) - width for s in streams.seen]
            streams.rollback([m + 1 + n for m, n in zip(seen_at_mark, accepted.flatten().tolist())])
            hidden = streams.hidden[chosen, a]
            nxt = [self._next(probs[c, n]) for c, n in zip(chosen, a)]
            streams.select(chosen)
            steps += len(live)
            still = []
            for i, r in enumerate(live):
                outs[r], done = finish(outs[r] + rows[chosen[i], 1:a[i] + 1].tolist() + [nxt[i]], max_new_tokens, eos_id)
                if not done:
                    still.append(i)
            if len(still) < len(live):
                streams.select(still)
                live, hidden = [live[i] for i in still], hidden[still]
            token = torch.tensor([nxt[i] for i in still], device=device)
        return outs, steps

    def _one(self, model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None):
        device = next(model.parameters()).device
        tree, n_nodes = self.tree, len(self.tree)
        mask = tree.mask.to(device)
        max_len = min(model.max_seq_len, len(prompt) + max_new_tokens + n_nodes)
        # compile: static states (fixed shapes, kept between calls) and a compiled tree step
        states = self.static.get(model, 1, device) if self.compile else model.init_states(1, max_len, device=device)
        rows = self.verify == "rows" or (self.verify == "auto" and TREE_MASK not in capabilities_of(model))
        res = model(torch.tensor([prompt], device=device), states=states)
        token = int(self.sampler(res.logits[:, -1].float())[0])
        hidden = res.hidden[0, -1]
        out, done = finish([token], max_new_tokens, eos_id)
        steps = 0
        depth = torch.tensor(tree.depth, device=device)
        rank, parent = torch.tensor(tree.rank, device=device), torch.tensor(tree.parent, device=device)
        while not done and len(prompt) + len(out) + n_nodes <= max_len:
            if rows:
                nodes = torch.cat([torch.tensor([token], device=device), self._guesses(hidden, depth[1:], rank[1:])])
                accepted, token, hidden = self._verify_rows(model, states, nodes)
                out, done = finish(out + accepted + [token], max_new_tokens, eos_id)
                steps += 1
                continue
            start = len(prompt) + len(out) - 1  # tokens in the states: the prompt and out but its last
            for s in states:
                s.tree = mask
            last = torch.tensor([token], device=device)
            nodes, logits, hiddens = self._tree_step(model, last, hidden, states, depth, rank)
            probs = self.sampler.probs(logits.float())  # (nodes, V)
            ok = self._accepted(probs, nodes, parent, mask)
            best = int(torch.where(ok, depth, -1).argmax())  # deepest accepted node (first on ties)
            path = tree.path_to(best)
            keep = torch.tensor([0] + path, device=device)
            for s in states:
                s.keep(start, keep)
            token = self._next(probs[best])
            hidden = hiddens[best]
            out, done = finish(out + nodes[keep[1:]].tolist() + [token], max_new_tokens, eos_id)
            steps += 1
        if not done:  # too close to the end of the context for a full tree: finish one at a time
            res = model(torch.tensor([[token]], device=device), states=states)
            while not done and len(prompt) + len(out) < max_len:
                token = int(self.sampler(res.logits[:, -1].float())[0])
                out, done = finish(out + [token], max_new_tokens, eos_id)
                steps += 1
                if not done:
                    res = model(torch.tensor([[token]], device=device), states=states)
        return out, steps


@hookimpl
def llmzoo_validate(cfg: DictConfig) -> list[str]:
    """decoder=medusa decodes with the heads objective=medusa trains, at most as deep as
    there are heads (a rule between two groups, so a hook rather than ``Medusa.check``)."""
    decoder, objective = node_class(cfg.get("decoder")), node_class(cfg.get("objective"))
    if not (isinstance(decoder, type) and issubclass(decoder, Medusa)):
        return []
    if not (isinstance(objective, type) and issubclass(objective, MedusaObjective)):
        target = cfg.objective.get("_target_") if isinstance(cfg.get("objective"), DictConfig) else None
        return ["decoder=medusa decodes with Medusa heads, which only objective=medusa trains "
                f"(objective._target_={target!r}); train with objective=medusa, or choose another decoder"]
    try:
        depth = Tree(cfg.decoder.get("tree") or DEFAULT_TREE).max_depth
    except ValueError:
        return []  # Medusa.check reports it
    heads = cfg.objective.get("n_heads")
    return [f"decoder.tree is {depth} deep but objective.n_heads={heads}"] if isinstance(heads, int) and depth > heads else []
