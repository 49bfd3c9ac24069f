"""EAGLE (Li et al. 2024): speculative decoding with a draft head that extrapolates the
target's features instead of a separate draft model.

``objective=eagle`` trains the head with the target frozen. The head reads, at position t,
the target's last hidden state f_t (after its final norm) and the embedding of token
t + 1, and predicts f_{t+1}:

    f^_{t+1} = Block(W [f_t ; e(x_{t+1})])          one layer (``objective.layer``: the dense block)
    loss = SmoothL1(f^_{t+1}, f_{t+1}) + w_cls * CE(softmax(head(f_{t+1})), head(f^_{t+1}))

the second term a cross-entropy against the target's own next-token distribution
(its frozen vocabulary head ``head``), so the draft learns the target, not the data.

``decoder=eagle`` decodes with it: each step the head drafts ``k`` tokens one by one (its
own features feeding the next draft), the target scores them in one forward, and they are
accepted left to right exactly as in ``decoder=speculative`` (greedy: the target's argmax;
sampling: min(1, p/q) with the corrected residual), so greedy EAGLE gives plain greedy's
tokens for every block (the target's state is rolled back by ``rewind`` or from a copy).
The head's own KV cache is kept on the target's true features: after verification the
accepted positions are fed again with them. Drafting is a chain, not EAGLE-2's dynamic
tree. A batch is decoded together when the target's blocks and the head's layer have
``row_state`` (``RowStreams``; each row accepts its own count), else row by row.
``compile: true`` (chain drafting, KV-cache targets: dense, MoE; one prompt at a time)
verifies over the target's static KV caches with the verify forward compiled, one graph
per token count, as ``decoder=speculative decoder.compile=true``; the head drafts eagerly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from llmzoo import hookimpl
from llmzoo.config import node_class
from llmzoo.shared.decoding import (RowStreams, Sampler, StaticStates, Stream, accept, ancestor_mask, check_prompts, finish,
                                    has_rows, one_at_a_time)
from llmzoo.interfaces import (KV_CACHE, ROW_STATE, STATEFUL, STATIC_STATE, TREE_MASK,
                               Batch, Loss, ModelOutput, capabilities_of)


def ancestors(parents: list[int], j: int) -> list[int]:
    """The ancestors of node j, nearest first (-1: no parent)."""
    out = []
    while parents[j] >= 0:
        j = parents[j]
        out.append(j)
    return out


def ancestors_path(parents: list[int], j: int) -> list[int]:
    """Nodes from the root's child down to j in a tree whose root is node 0."""
    path = []
    while j:
        path.append(j)
        j = parents[j]
    return path[::-1]


class EagleHead(nn.Module):
    """[f_t ; e(x_{t+1})] -> f^_{t+1}: a linear from 2 * dim to dim, then one block
    (``layer``: a stateful block class built as ``layer(dim, n_heads, max_seq_len)``)."""

    def __init__(self, dim: int, n_heads: int, max_seq_len: int, layer: type[nn.Module]):
        super().__init__()
        self.fc = nn.Linear(2 * dim, dim)
        self.block = layer(dim, n_heads, max_seq_len)

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor, state=None) -> torch.Tensor:
        return self.block(self.fc(torch.cat([feats, embeds], dim=-1)), state=state)


def verify_forward(model: nn.Module, ids: torch.Tensor, states: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's forward over ``ids`` (1, T): its (T, V) logits and (T, D) features
    (``compile``: compiled once per T)."""
    res = model(ids, states=states)
    return res.logits[0], res.hidden[0]


def head_shape(model: nn.Module) -> int:
    """Attention heads of the draft layer: the target's where it has attention, else dim / 64."""
    mixer = getattr(model.blocks[0], "mixer", None)
    n = getattr(mixer, "n_heads", None)
    return n if n and model.dim % n == 0 else max(1, model.dim // 64)


class EagleObjective(nn.Module):
    """Owns the draft head (sized by ``setup(model)``); see the module docstring for the loss."""

    needs = frozenset({"input_ids"})
    reads = frozenset({"hidden", "logits"})

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        layer = node.get("layer")
        try:
            cls = get_class(layer) if isinstance(layer, str) else None
        except Exception as e:  # noqa: BLE001 -- any import failure is the user's to fix
            return [f"objective.layer={layer!r} cannot be imported: {type(e).__name__}: {e}"]
        if cls is not None and not callable(getattr(cls, "init_state", None)):
            return [f"objective.layer={layer!r} is not a stateful block (no init_state); use e.g. "
                    "llmzoo_plugins.attention.DenseBlock"]
        return []

    def __init__(self, cls_weight: float = 0.1, layer: str | type[nn.Module] = "llmzoo_plugins.attention.DenseBlock"):
        super().__init__()
        if cls_weight < 0:
            raise ValueError(f"objective.cls_weight must be >= 0, got {cls_weight}")
        self.cls_weight = cls_weight
        self.layer = get_class(layer) if isinstance(layer, str) else layer  # named like a _target_
        self.head: EagleHead | None = None
        self.target: list[nn.Module] = []  # the frozen target (not a submodule: not saved twice)

    def setup(self, model: nn.Module, tokenizer=None) -> None:
        model.requires_grad_(False)  # the target stays as it is
        self.target = [model]
        if self.head is None:
            self.head = EagleHead(model.dim, head_shape(model), model.max_seq_len, self.layer).to(model.head.weight.device)

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        model = self.target[0]
        feats, ids = out.hidden.detach(), batch["input_ids"]
        pred = self.head(feats[:, :-1], model.embedding(ids[:, 1:]).detach())
        regression = F.smooth_l1_loss(pred.float(), feats[:, 1:].float())
        target_p = out.logits[:, 1:].detach().float().softmax(-1)
        draft_logp = model.head(pred).float().log_softmax(-1)
        cls = -(target_p * draft_logp).sum(-1).mean()
        agree = (draft_logp.argmax(-1) == target_p.argmax(-1)).float().mean()
        return Loss(regression + self.cls_weight * cls,
                    {"feature_loss": regression.detach(), "token_ce": cls.detach(), "draft_top1": agree.detach()},
                    measure=(regression + self.cls_weight * cls).detach())


class Eagle:
    """Chain drafting with an EAGLE head (from a run trained with ``objective=eagle``)."""

    requires = frozenset({STATEFUL})

    @staticmethod
    def requires_for(node: DictConfig) -> frozenset[str]:
        """``compile: true`` verifies over static KV caches that rewind."""
        return frozenset({STATEFUL, STATIC_STATE, KV_CACHE}) if node.get("compile") else Eagle.requires

    def __init__(self, k: int = 4, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, head: EagleHead | EagleObjective | None = None,
                 draft: str = "chain", width: int = 4, budget: int = 16, compile: bool = False,
                 mode: str | None = "reduce-overhead", backend: str = "inductor"):
        if k < 1:
            raise ValueError(f"decoder.k must be >= 1, got {k}")
        if draft not in ("chain", "tree"):
            raise ValueError(f"decoder.draft={draft!r} is not one of ['chain', 'tree']")
        if width < 1 or budget < 1:
            raise ValueError(f"decoder.width and decoder.budget must be >= 1, got {width} and {budget}")
        self.k, self.sampler = k, Sampler(temperature, top_k, top_p, seed)
        self.draft, self.width, self.budget = draft, width, budget
        self.head = head.head if isinstance(head, EagleObjective) else head
        self.stats: dict[str, float] = {}
        if compile and draft == "tree":
            raise ValueError("decoder.compile=true verifies EAGLE's chain: set decoder.draft=chain")
        self.compile, self.static = compile, StaticStates(compile, mode, backend)
        self._verify = self.static.compile(verify_forward, "the EAGLE verify forward")

    def setup(self, run) -> None:
        objective = getattr(run, "objective", None)
        if not isinstance(objective, EagleObjective) or objective.head is None:
            raise ValueError("decoder=eagle needs a run trained with objective=eagle (its draft head); this "
                             f"run's objective is {run.cfg.objective.get('_target_')}")
        self.head = objective.head

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        check_prompts(prompts)
        if self.head is None:
            raise ValueError("decoder=eagle has no draft head: load a run trained with objective=eagle")
        self.sampler.reset()
        block = self.head.block
        tree = (self.draft == "tree" and self.sampler.greedy and TREE_MASK in capabilities_of(model)
                and TREE_MASK in capabilities_of(block))
        if tree:
            outs, steps = one_at_a_time(lambda p: self._one_tree(model, p, max_new_tokens, eos_id), prompts)
        elif (len(prompts) > 1 and min(map(len, prompts)) > 1 and has_rows(model) and not self.compile
                and ROW_STATE in capabilities_of(block) and KV_CACHE in capabilities_of(block)):
            outs, steps = self._batched(model, [list(p) for p in prompts], max_new_tokens, eos_id)
        else:
            outs, steps = one_at_a_time(lambda p: self._one(model, p, max_new_tokens, eos_id), prompts)
        self.stats = {"accepted_per_step": sum(map(len, outs)) / max(steps, 1), "steps": steps}
        if self.static.compile_s:
            self.stats["compile_s"] = self.static.compile_s
        return outs

    def _batched(self, model: nn.Module, seqs: list[list[int]], max_new_tokens: int, eos_id: int | None):
        """All rows at once: the target over row states (``RowStreams``), the head over a
        rows=True KV cache. Rows catch up on different numbers of true features: the head
        is fed the longest count, padded, and each row rewinds its padding."""
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, max(map(len, seqs)) + max_new_tokens + self.k + 1)
        target = RowStreams(model, [s[:-1] for s in seqs], max_len, device)  # all but the last token
        feats = [list(h) for h in target.prefix_hidden]  # feats[r][i]: the target's feature after seqs[r][i]
        head_state = self.head.block.init_state(len(seqs), max_len + 2 * self.k + 2, device=device, dtype=None,
                                                rows=True)
        fed, live, outs, steps = [0] * len(seqs), list(range(len(seqs))), [[] for _ in seqs], 0
        while live:
            k = min(self.k, min(max_len - len(seqs[r]) for r in live))
            # 1. the head catches up on each row's new true features (padded to the longest)
            counts = [len(feats[r]) - fed[r] for r in live]
            width = max(counts)
            f_in = torch.zeros(len(live), width, model.dim, device=device, dtype=feats[live[0]][0].dtype)
            tokens = torch.zeros(len(live), width, dtype=torch.long, device=device)
            for i, r in enumerate(live):
                f_in[i, : counts[i]] = torch.stack(feats[r][fed[r]:])
                tokens[i, : counts[i]] = torch.tensor(seqs[r][fed[r] + 1:len(feats[r]) + 1], device=device)
                fed[r] = len(feats[r])
            pred = self.head(f_in, model.embedding(tokens), state=head_state)
            f = pred[torch.arange(len(live), device=device), torch.tensor(counts, device=device) - 1]  # (B, D)
            head_state.rewind([width - c for c in counts])
            # 2. k drafts per row, one head forward each
            proposals, qs = [], []
            for i in range(k):
                q = self.sampler.probs(model.head(f).float())
                proposals.append(q.argmax(-1) if self.sampler.greedy else self.sampler.draw(q))
                qs.append(q)
                if i < k - 1:
                    f = self.head(f[:, None], model.embedding(proposals[-1][:, None]), state=head_state)[:, -1]
            head_state.rewind(k - 1)  # drafted features are not the target's
            drafts, qs = torch.stack(proposals, 1).tolist(), torch.stack(qs, 1)
            # 3. the target scores [last token] + drafts of every row in one forward
            target.mark()
            ps = self.sampler.probs(target.feed([[seqs[r][-1]] + d for r, d in zip(live, drafts)]))
            steps += len(live)
            still = []
            for i, r in enumerate(live):
                n, extra = accept(self.sampler, drafts[i], list(qs[i]), ps[i], device)
                new = drafts[i][:n] + [extra]
                feats[r] += list(target.hidden[i, : n + 1])  # true features after seq[-1] and the accepted drafts
                outs[r], done = finish(outs[r] + new, max_new_tokens, eos_id)
                seqs[r] += new
                if not (done or len(seqs[r]) >= max_len):
                    still.append(i)
            target.rollback([len(seqs[r]) - 1 for r in live])
            if len(still) < len(live):
                target.select(still)
                head_state.reorder(torch.tensor(still, dtype=torch.long, device=device))
                live = [live[i] for i in still]
        return outs, steps

    def _draft_tree(self, model: nn.Module, head_state, f_root: torch.Tensor):
        """EAGLE-2's dynamic draft tree: from the head's feature after the last token,
        expand for ``k`` levels the ``width`` children with the highest cumulative
        log-probability, then keep the ``budget`` best nodes (ancestors first). Returns
        (tokens, parent of each node: -1 for the root's children), nodes ordered by depth."""
        logp = model.head(f_root).float().log_softmax(-1)
        top = logp.topk(self.width)
        tokens, parents, scores = top.indices.tolist(), [-1] * self.width, top.values.tolist()
        in_feats = [f_root] * self.width  # the feature each node's pair is fed with (its parent's)
        frontier = list(range(self.width))
        for _ in range(self.k - 1):
            n = len(tokens)
            head_state.tree = ancestor_mask(parents).to(f_root.device)
            out = self.head(torch.stack(in_feats)[None], model.embedding(torch.tensor([tokens], device=f_root.device)),
                            state=head_state)[0]  # (n, D): the feature after each node
            head_state.rewind(n)  # drafted features are not the target's
            head_state.tree = None
            child = model.head(out[frontier]).float().log_softmax(-1).topk(self.width)
            cand = [(scores[j] + v, j, t) for row, j in enumerate(frontier)
                    for v, t in zip(child.values[row].tolist(), child.indices[row].tolist())]
            cand.sort(key=lambda c: -c[0])
            frontier = []
            for score, j, t in cand[: self.width]:
                frontier.append(len(tokens))
                tokens.append(t), parents.append(j), scores.append(score), in_feats.append(out[j])
        keep = sorted(sorted(range(len(tokens)), key=lambda j: -scores[j])[: self.budget])
        keep = sorted(set(keep) | {a for j in keep for a in ancestors(parents, j)})
        where = {j: i for i, j in enumerate(keep)}
        return [tokens[j] for j in keep], [where[parents[j]] if parents[j] >= 0 else -1 for j in keep]

    def _one_tree(self, model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None):
        """Greedy decoding with a dynamic draft tree verified in one target forward (tree
        masks on both the target's and the head's KV caches)."""
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, len(prompt) + max_new_tokens + self.width * self.k + 2)
        states = model.init_states(1, max_len, device=device)
        head_state = self.head.block.init_state(1, max_len + self.width * self.k + 2, device=device, dtype=None)
        seq, feats, fed, out, steps, done = list(prompt), [], 0, [], 0, False
        if len(seq) > 1:  # the target consumes all but the last token
            feats = list(model(torch.tensor([seq[:-1]], device=device), states=states).hidden[0])
        while not done and len(seq) + self.width * self.k + 1 < max_len:
            tokens, parents = [], []
            if feats:  # the head catches up on the true features, then drafts a tree
                f = self._draft_feed(model, head_state, torch.stack(feats[fed:]), seq[fed + 1:len(feats) + 1])
                fed = len(feats)
                tokens, parents = self._draft_tree(model, head_state, f)
            # the target verifies root (the last token) + the tree in one forward
            tree_parents = [0] + [p + 1 for p in parents]  # node 0 is the root
            start = states[0].pos
            for state in states:
                state.tree = ancestor_mask([-1] + tree_parents[1:]).to(device)
            res = model(torch.tensor([[seq[-1]] + tokens], device=device), states=states)
            argmax = res.logits[0].float().argmax(-1).tolist()
            ok = [True] + [False] * len(tokens)
            for j in range(1, len(tree_parents)):  # parents come before children
                ok[j] = ok[tree_parents[j]] and argmax[tree_parents[j]] == tokens[j - 1]
            depth = [0] * len(tree_parents)
            for j in range(1, len(tree_parents)):
                depth[j] = depth[tree_parents[j]] + 1
            best = max((j for j in range(len(ok)) if ok[j]), key=lambda j: (depth[j], -j))
            path = ancestors_path(tree_parents, best)
            keep = torch.tensor([0] + path, device=device)
            for state in states:
                state.keep(start, keep)
            new = [tokens[j - 1] for j in path] + [argmax[best]]
            feats += list(res.hidden[0, keep])  # true features after seq[-1] and the accepted drafts
            steps += 1
            out, done = finish(out + new, max_new_tokens, eos_id)
            seq += new
        if not done:  # too close to the end for a whole tree: one token at a time
            res = model(torch.tensor([[seq[-1]]], device=device), states=states)
            while not done and len(seq) < max_len:
                token = int(res.logits[0, -1].argmax())
                out, done = finish(out + [token], max_new_tokens, eos_id)
                seq.append(token)
                steps += 1
                if not done and len(seq) < max_len:
                    res = model(torch.tensor([[token]], device=device), states=states)
        return out, steps

    def _draft_feed(self, model, state, feats: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """The head consumes (feature, next token) pairs; its last predicted feature (D,)."""
        emb = model.embedding(torch.tensor([tokens], device=feats.device))
        return self.head(feats[None], emb, state=state)[0, -1]

    def _one(self, model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None):
        device = next(model.parameters()).device
        max_len = min(model.max_seq_len, len(prompt) + max_new_tokens + self.k + 1)
        target = Stream(model, max_len, device, self.static if self.compile else None)
        if self.compile and not target.rewindable:
            raise ValueError("decoder.compile=true needs the target's blocks to have static KV caches that rewind "
                             "(dense, MoE)")
        head_state = self.head.block.init_state(1, max_len, device=device, dtype=None)
        seq, feats = list(prompt), []  # feats[i]: the target's feature after seq[i] (true ones only)
        if len(seq) > 1:  # invariant: the target has consumed all of seq but its last token
            feats = list(model(torch.tensor([seq[:-1]], device=device), states=target.states).hidden[0])
            target.seen += seq[:-1]
        fed = 0  # pairs (feats[i], seq[i + 1]) the head's cache holds
        out, steps, done = [], 0, False
        while not done:
            k = min(self.k, max_len - len(seq))
            # 1. the head catches up on true features, then drafts k tokens
            proposals, qs = [], []
            if feats:
                f = self._draft_feed(model, head_state, torch.stack(feats[fed:]), seq[fed + 1:len(feats) + 1])
                fed = len(feats)
                mark = head_state.pos
                for i in range(k):
                    q = self.sampler.probs(model.head(f)[None].float())
                    proposals.append(int(q.argmax()) if self.sampler.greedy else int(self.sampler.draw(q)))
                    qs.append(q[0])
                    if i < k - 1:
                        f = self._draft_feed(model, head_state, f[None], proposals[-1:])
                head_state.rewind(head_state.pos - mark)  # drafted features are not the target's
            # 2. the target scores [last token] + proposals in one forward
            target.mark()
            logits, hidden = self._verify(model, torch.tensor([[seq[-1]] + proposals], device=device), target.states)
            target.seen += [seq[-1]] + proposals
            ps = self.sampler.probs(logits.float())
            # 3. accept left to right (as decoder=speculative); the first rejection is replaced
            n, extra = accept(self.sampler, proposals, qs, ps, device)
            new = proposals[:n] + [extra]
            feats += list(hidden[: n + 1])  # true features after seq[-1] and the accepted drafts
            steps += 1
            out, done = finish(out + new, max_new_tokens, eos_id)
            seq += new
            done = done or len(seq) >= max_len
            target.rollback(len(seq) - 1)
        return out, steps


@hookimpl
def llmzoo_validate(cfg: DictConfig) -> list[str]:
    """decoder=eagle drafts with the head objective=eagle trains (a rule between two groups)."""
    decoder, objective = node_class(cfg.get("decoder")), node_class(cfg.get("objective"))
    if not (isinstance(decoder, type) and issubclass(decoder, Eagle)):
        return []
    if isinstance(objective, type) and issubclass(objective, EagleObjective):
        return []
    target = cfg.objective.get("_target_") if isinstance(cfg.get("objective"), DictConfig) else None
    return ["decoder=eagle drafts with the head that objective=eagle trains "
            f"(objective._target_={target!r}); train with objective=eagle, or choose another decoder"]
