"""Token-level quantities objectives share: next-token cross-entropy and the summed
log-probability of a sequence's labelled tokens (DPO, reward and RL objectives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interfaces import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> targets (B, T): targets[:, t] = labels[:, t + 1], the last is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of logits[:, t] against labels[:, t + 1] over labels != -100.
    logits (B, T, V), labels (B, T). Returns (loss, number of counted tokens).
    The labels are shifted (not the logits), so the logits are never copied."""
    target = shifted_labels(labels).flatten()
    n = (target != IGNORE_INDEX).sum()
    return F.cross_entropy(logits.flatten(0, 1).float(), target, ignore_index=IGNORE_INDEX), n


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum over t of log p(labels[:, t + 1] | tokens <= t), counting labels != -100.
    logits (B, T, V) float32-accumulated, labels (B, T)."""
    target = shifted_labels(labels)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)
