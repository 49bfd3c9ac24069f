"""Token-level quantities objectives share (a library, not contract): next-token
cross-entropy (from logits, or fused with the vocabulary head: ``linear_cross_entropy``)
and the summed log-probability of a sequence's labelled tokens (DPO, reward and RL
objectives)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..interfaces import IGNORE_INDEX, Batch, Loss


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """Number of next-token targets in ``labels`` (B, T): what ``next_token_loss`` averages over."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def shifted_labels(labels: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """labels (B, T) -> targets (B, T): targets[:, t] = labels[:, t + shift], the last
    ``shift`` positions ignored."""
    return F.pad(labels[:, shift:], (0, shift), value=IGNORE_INDEX)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of logits[:, t] against labels[:, t + 1] over labels != -100.
    logits (B, T, V), labels (B, T). Returns (loss, number of counted tokens).
    The labels are shifted (not the logits), so the logits are never copied."""
    target = shifted_labels(labels).flatten()
    n = (target != IGNORE_INDEX).sum()
    return F.cross_entropy(logits.flatten(0, 1).float(), target, ignore_index=IGNORE_INDEX), n


LINEAR_CE_BACKENDS = ("auto", "liger", "reference")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         z_loss: float = 0.0, chunk_size: int = 1024,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``target`` without ever
    holding all of them: hidden (..., D), weight (V, D), target (...) with -100 ignored.

    Returns ``(loss, ce, z)``: ``ce`` the mean cross-entropy over the counted targets,
    ``z`` the mean squared log-partition, ``loss = ce + z_loss * z`` (differentiable in
    hidden and weight; ``ce`` and ``z`` are detached figures). Equal to
    ``F.cross_entropy(hidden @ weight.T, target)`` within float32 rounding
    (tests/test_objective.py), with peak memory of one (chunk_size, V) block instead of
    (N, V) logits and their gradient.

    ``backend``: "reference" is plain PyTorch (``_ChunkedLinearCE``); "liger" is Liger-Kernel's
    fused Triton kernel (CUDA, ``z_loss=0``); "auto" takes Liger where it can run.
    """
    h, t = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if backend not in LINEAR_CE_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(LINEAR_CE_BACKENDS)}")
    fn = _liger_flce() if backend != "reference" and h.is_cuda and not z_loss else None
    if backend == "liger" and fn is None:
        raise RuntimeError("backend=liger needs liger-kernel installed, CUDA tensors and z_loss=0; "
                           "backend=auto falls back to the PyTorch reference")
    if fn is not None:
        if torch.is_autocast_enabled("cuda"):  # the kernel takes one dtype: autocast's
            dtype = torch.get_autocast_dtype("cuda")
            h, weight = h.to(dtype), weight.to(dtype)
        ce = fn(h, weight, t)  # positional: some versions export Function.apply (no keywords); -100 ignored
        ce = ce[0] if isinstance(ce, tuple) else ce  # versions that also return the z-loss
        return ce, ce.detach(), torch.zeros((), device=h.device)
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)  # not in validation
    return _ChunkedLinearCE.apply(h, weight, t, float(z_loss), int(chunk_size), grads)


@functools.cache  # one import attempt per process, not one per training step
def _liger_flce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - not installed, or no Triton
        return None
    return liger_fused_linear_cross_entropy


class _ChunkedLinearCE(torch.autograd.Function):
    """The PyTorch reference of ``linear_cross_entropy``. The forward takes the labelled
    rows ``chunk_size`` at a time: it forms their logits in float32, adds up CE and the
    squared log-partition, and -- when gradients are wanted -- also their gradient
    d(loss)/d(logits) = (softmax * (1 + 2 z lse) - onehot) / n, which it folds straight
    into d(hidden) (rows) and d(weight) (accumulated) before dropping the block. The
    backward only scales those by the incoming gradient. Unlabelled rows cost nothing."""

    @staticmethod
    def forward(ctx, h, weight, t, z_loss, chunk_size, grads):
        keep = (t != IGNORE_INDEX).nonzero()[:, 0]
        rows, t = h[keep], t[keep]
        n = max(len(t), 1)
        grad_rows = torch.empty_like(rows) if grads and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        ce = z = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, len(t), chunk_size):
            x, y = rows[s:s + chunk_size], t[s:s + chunk_size]
            logits = (x @ weight.to(x.dtype).t()).float()
            picked = logits.gather(1, y[:, None])[:, 0]
            top = logits.amax(-1)
            p = logits.sub_(top[:, None]).exp_()  # exp(logits - max) in the logits' memory: no (chunk, V)
            total = p.sum(-1)                      # temporary besides the block itself
            lse = top + total.log()
            ce = ce + (lse - picked).sum()
            z = z + (lse ** 2).sum()
            if grad_rows is not None or grad_w is not None:
                g = p.div_(total[:, None])  # the softmax
                if z_loss:
                    g.mul_(1 + 2 * z_loss * lse[:, None])
                g[torch.arange(len(y), device=g.device), y] -= 1
                g = g.div_(n).to(x.dtype)
                if grad_rows is not None:
                    grad_rows[s:s + chunk_size] = g @ weight.to(x.dtype)
                if grad_w is not None and x.dtype == torch.float32:
                    grad_w.addmm_(g.t(), x)  # no (V, D) temporary
                elif grad_w is not None:
                    grad_w += (g.t() @ x).float()
        ce, z = ce / n, z / n
        # kept on ctx, not saved tensors: backward hands them on and drops its reference, so
        # autograd takes d(weight) without copying it
        ctx.keep, ctx.grad_rows, ctx.grad_w = keep, grad_rows, grad_w
        ctx.shape, ctx.dtypes = h.shape, (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, z)
        return ce + z_loss * z, ce, z

    @staticmethod
    def backward(ctx, g, _ce, _z):
        if ctx.grad_w is None and ctx.grad_rows is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("linear_cross_entropy: backward ran twice through one loss (its gradients "
                               "are computed in the forward and handed over once)")
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = torch.zeros(ctx.shape, dtype=ctx.dtypes[0], device=g.device)
            dh[ctx.keep] = (ctx.grad_rows * g).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dw = ctx.grad_w.mul_(g).to(ctx.dtypes[1])
        ctx.grad_rows = ctx.grad_w = None
        return dh, dw, None, None, None, None


def next_token_ce(out, labels: torch.Tensor, *, z_loss: float = 0.0,
                  fused: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Next-token cross-entropy of a ``ModelOutput`` against labels (B, T): from its logits,
    or -- when the model ran with ``logits=False`` -- from ``hidden`` and ``head_weight``
    through ``linear_cross_entropy`` (``fused``: its keywords). Returns ``(loss, ce, z, n)``:
    loss = ce + z_loss * z (z the mean squared log-partition, None when z_loss is 0), ``ce``
    and ``z`` detached, ``n`` the number of counted tokens."""
    if out.logits is None:
        target = shifted_labels(labels)
        loss, ce, z = linear_cross_entropy(out.hidden, out.head_weight, target, z_loss=z_loss, **(fused or {}))
        return loss, ce, (z if z_loss else None), (target != IGNORE_INDEX).sum()
    ce, n = next_token_loss(out.logits, labels)
    if not z_loss:
        return ce, ce.detach(), None, n
    z = (out.logits[:, :-1].float().logsumexp(-1) ** 2)[labels[:, 1:] != IGNORE_INDEX].mean()
    return ce + z_loss * z, ce.detach(), z.detach(), n


class FusedCEOption:
    """The ``fused_ce`` / ``fused_backend`` / ``fused_chunk`` keys of a next-token
    cross-entropy objective (objective=clm and sft): with ``fused_ce`` the objective reads
    ``hidden`` and ``head_weight`` instead of logits, and ``next_token_ce(out, labels,
    fused=self.fused)`` fuses the head into the loss."""

    reads = frozenset({"logits", "aux_loss"})

    def init_fused(self, fused_ce: bool, fused_backend: str, fused_chunk: int) -> None:
        self.fused = {"backend": fused_backend, "chunk_size": fused_chunk}
        if fused_ce:
            self.reads = self.reads_for({"fused_ce": True})

    @staticmethod
    def reads_for(node) -> frozenset[str]:
        return frozenset({"hidden", "head_weight", "aux_loss"} if node.get("fused_ce") else {"logits", "aux_loss"})

    @staticmethod
    def check(node, cfg) -> list[str]:
        problems = []
        backend, chunk = node.get("fused_backend", "auto"), node.get("fused_chunk", 1024)
        if not isinstance(node.get("fused_ce", False), bool):
            problems.append(f"objective.fused_ce={node.get('fused_ce')!r} must be true or false")
        if backend not in LINEAR_CE_BACKENDS:
            problems.append(f"objective.fused_backend={backend!r} is not one of {list(LINEAR_CE_BACKENDS)}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            problems.append(f"objective.fused_chunk={chunk!r} must be a positive number of tokens")
        if backend == "liger" and node.get("z_loss"):
            problems.append("objective.fused_backend=liger computes plain cross-entropy: set z_loss=0, or "
                            "fused_backend=auto (the PyTorch reference handles z_loss)")
        return problems


def pair_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (2B, T): chosen and rejected of each pair in consecutive rows,
    padded to one width, so one forward scores both (and a micro-batch keeps pairs whole)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def rows(key: str, value: int) -> torch.Tensor:
        c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        c, r = F.pad(c, (0, width - c.shape[1]), value=value), F.pad(r, (0, width - r.shape[1]), value=value)
        return torch.stack([c, r], dim=1).flatten(0, 1)

    return rows("input_ids", 0), rows("labels", IGNORE_INDEX)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """(B,) sum over t of log p(labels[:, t + 1] | tokens <= t), counting labels != -100;
    ``mean``: divided by that count (the length-normalised log-likelihood of IPO, SimPO, ORPO).
    logits (B, T, V) float32-accumulated, labels (B, T)."""
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    return picked / mask.sum(-1).clamp(min=1) if mean else picked


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log p of each next labelled token (0 elsewhere), and the (B, T) bool mask of
    those positions: position t scores labels[:, t + 1]."""
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def prompt_response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                          device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels) of prompt + response rows, labels only on the response
    (what RL objectives score)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), labels.to(device)


def pair_average_logprobs(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised log-likelihoods (B,) of chosen and rejected, from the logits of the
    (chosen, rejected, ...) rows of ``pair_rows``."""
    logp = sequence_logprobs(logits, pair_rows(batch)[1], mean=True)
    return logp[0::2], logp[1::2]
