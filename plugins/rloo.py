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

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmzoo.api import frozen_reference
from llmzoo.shared.decoding import scored_rollout
from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.shared.losses import token_logprobs


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N * k,) in groups of k consecutive responses -> R_i - mean of the others."""
    g = rewards.view(-1, group_size)
    return (g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)).flatten()


class RLOO(nn.Module):
    """k sampled responses per prompt, a leave-one-out baseline and a plain REINFORCE loss."""

    needs = frozenset({"prompt_ids", "prompt_lens"})

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        if cfg.get("reward") is None:
            return ["objective=rloo needs a reward: add reward=exact_answer, reward=keyword or reward=length"]
        return []

    def __init__(self, reward: Any, decoder: Any, group_size: int = 4, max_new_tokens: int = 32,
                 beta: float = 0.05, seed: int | None = 0):
        super().__init__()
        if reward is None:
            raise ValueError("objective=rloo needs a reward: reward=exact_answer|keyword|length")
        if group_size < 2:
            raise ValueError(f"objective.group_size must be >= 2 (the baseline is the other responses), got {group_size}")
        self.reward, self.decoder, self.group_size = reward, decoder, group_size
        self.max_new_tokens, self.beta = max_new_tokens, beta
        self.seed, self.rollouts = seed, 0  # rollout i samples with seed + i (repeatable runs)
        self.ref: list[nn.Module] = []  # frozen starting model, not trained or saved
        self.tokenizer = None

    def setup(self, model: nn.Module, tokenizer: Any) -> None:
        self.ref, self.tokenizer = [frozen_reference(model)], tokenizer

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        batch = scored_rollout(model, self.ref[0], self.decoder, self.tokenizer, self.reward, batch,
                               repeat=self.group_size, max_new_tokens=self.max_new_tokens,
                               seed=None if self.seed is None else self.seed + self.rollouts)
        self.rollouts += 1
        logp, _ = token_logprobs(model(batch["sequences"]).logits, batch["response_labels"])
        kl = (logp - batch["ref_logp"]).sum(-1)
        shaped = batch["rewards"] - self.beta * kl
        return {**batch, "kl": kl, "advantages": leave_one_out_advantages(shaped, self.group_size)}

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch["sequences"]  # group_size consecutive rows per prompt

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        logp, _ = token_logprobs(out.logits, batch["response_labels"])
        loss = -(batch["advantages"] * logp.sum(-1)).mean()
        rewards = batch["rewards"]
        metrics = {"reward": rewards.mean(), "reward_std": rewards.std(), "kl": batch["kl"].mean(),
                   "response_tokens": batch["response_lengths"].mean()}
        return Loss(loss, metrics, measure=-rewards.mean())
