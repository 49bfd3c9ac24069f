"""Simple Preference Optimization (``objective=simpo`` with ``data=preferences``;
Meng, Xia and Chen 2024): DPO without a reference model. The implicit reward is the
length-normalised log-likelihood, and a target margin gamma separates the pair:

    loss = -log sigmoid( beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma )

where log pi(y|x) sums the response tokens' log-probabilities and |y| counts them.
Metrics: the rewards beta / |y| * log pi(y|x) of chosen and rejected, their margin and
the accuracy (chosen reward > rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.shared.losses import pair_average_logprobs, pair_rows


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per-pair losses (B,) from length-normalised log-likelihoods (B,) -- the formula above."""
    return -F.logsigmoid(beta * avg_chosen - beta * avg_rejected - gamma)


class SimPO:
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        if beta <= 0:
            raise ValueError(f"objective.beta must be > 0, got {beta}")
        if gamma < 0:
            raise ValueError(f"objective.gamma (the target reward margin) must be >= 0, got {gamma}")
        self.beta, self.gamma = beta, gamma

    def inputs(self, batch: Batch) -> torch.Tensor:
        return pair_rows(batch)[0]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        chosen, rejected = pair_average_logprobs(out.logits, batch)
        losses = simpo_loss(chosen, rejected, self.beta, self.gamma)
        rc, rr = self.beta * chosen.detach(), self.beta * rejected.detach()
        return Loss(losses.mean(), {"rewards_chosen": rc.mean(), "rewards_rejected": rr.mean(),
                                    "reward_margin": (rc - rr).mean(), "reward_accuracy": (rc > rr).float().mean()})
