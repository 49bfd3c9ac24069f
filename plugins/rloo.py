"""REINFORCE Leave-One-Out (``objective=rloo`` with ``data=prompts`` and a ``reward=...``;
Ahmadian et al. 2024, "Back to Basics", after Kool et al. 2019).

Each training step samples k = ``group_size`` responses per prompt (like GRPO) and scores
them with the reward; the KL penalty to the frozen starting model is folded into the
sequence reward, and each response's baseline is the mean of the *other* k - 1:

    R_i = r(x, y_i) - beta * sum_t [log pi(y_i,t) - log ref(y_i,t)]     (no gradient)
    A_i = R_i - 1 / (k - 1) * sum_{j != i} R_j
    loss = -1/k * sum_i A_i * log pi(y_i | x)         averaged over prompts

log pi(y|x) sums the response's token log-probabilities. One optimisation step per rollout
(no ratio clipping), as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.losses import token_logprobs
from llmzoo_plugins.grpo import GRPO


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N * k,) in groups of k consecutive responses -> R_i - mean of the others."""
    g = rewards.view(-1, group_size)
    return (g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)).flatten()


class RLOO(GRPO):
    """GRPO's rollouts with RLOO's baseline and plain REINFORCE loss (``clip`` unused)."""

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        batch = super().prepare(model, batch)
        logp, _ = token_logprobs(model(batch["sequences"]).logits, batch["response_labels"])
        kl = (logp - batch["ref_logp"]).sum(-1)
        shaped = batch["rewards"] - self.beta * kl
        return {**batch, "kl": kl, "advantages": leave_one_out_advantages(shaped, self.group_size)}

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        logp, _ = token_logprobs(out.logits, batch["response_labels"])
        loss = -(batch["advantages"] * logp.sum(-1)).mean()
        rewards = batch["rewards"]
        metrics = {"reward": rewards.mean(), "reward_std": rewards.std(), "kl": batch["kl"].mean(),
                   "response_tokens": batch["response_lengths"].mean()}
        return Loss(loss, metrics, measure=-rewards.mean())
