"""Where a model meets its objective (``run_objective``), and the token-level quantities
objectives share: next-token cross-entropy and the summed log-probability of a
sequence's labelled tokens (DPO, reward and RL objectives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interfaces import IGNORE_INDEX, Batch, Loss


def model_inputs(objective, batch: Batch) -> torch.Tensor:
    """The (k * B, T) token ids the model runs on for ``objective`` (default ``input_ids``)."""
    inputs = getattr(objective, "inputs", None)
    return inputs(batch) if inputs is not None else batch["input_ids"]


def batch_size(batch: Batch) -> int:
    """The number of rows of a batch (of its first tensor)."""
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def batch_rows(batch: Batch, index) -> Batch:
    """Rows ``index`` (a slice or index tensor) of every per-row tensor; other values kept."""
    n = batch_size(batch)
    return {k: v[index] if torch.is_tensor(v) and v.dim() and len(v) == n else v for k, v in batch.items()}


def batch_weight(objective, batch: Batch) -> torch.Tensor:
    """What the objective's loss averages over (default: the number of batch rows)."""
    weight = getattr(objective, "weight", None)
    return weight(batch) if weight is not None else torch.tensor(float(batch_size(batch)))


def run_objective(model, objective, batch: Batch) -> Loss:
    """The one path from a batch to a loss: prepare (optional), run the model, score it."""
    prepare = getattr(objective, "prepare", None)
    if prepare is not None:
        with torch.no_grad():
            batch = prepare(model, batch)
    return objective.loss(model(model_inputs(objective, batch)), batch)


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
