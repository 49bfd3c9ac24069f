"""Group Relative Policy Optimization (``objective=grpo`` with ``data=prompts`` and a
``reward=...``; Shao et al. 2024, DeepSeekMath).

Each training step, for every prompt of the batch:
  1. sample ``group_size`` responses with the configured decoder (any decoder plugin);
  2. score them with the reward (rule-based, see rewards.py);
  3. advantage of a response = (r - mean of its group) / (std of its group + 1e-4) --
     no value model;
  4. loss per response token = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
     + beta * KL, with ratio = pi / pi_old and the k3 estimator
     KL = ref / pi - log(ref / pi) - 1 against the frozen starting model; averaged over
     each response's tokens, then over responses.
One optimisation step per rollout batch, so pi_old = pi (ratio 1, gradient of log pi).
Validation samples responses for the held-out prompts and reports their mean reward
(``val_loss`` is minus that).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmzoo.shared.decoding import scored_rollout
from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.shared.losses import token_logprobs


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N * G,) in groups of G consecutive responses -> normalised advantages."""
    g = rewards.view(-1, group_size)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=False) + 1e-4)).flatten()


class GRPO(nn.Module):
    needs = frozenset({"prompt_ids", "prompt_lens"})

    @staticmethod
    def check(node: DictConfig, cfg: DictConfig) -> list[str]:
        if cfg.get("reward") is None:
            return ["objective=grpo needs a reward: add reward=exact_answer, reward=keyword or reward=length"]
        return []

    def __init__(self, reward: Any, decoder: Any, group_size: int = 4, max_new_tokens: int = 32,
                 beta: float = 0.04, clip: float = 0.2, seed: int | None = 0):
        super().__init__()
        if reward is None:
            raise ValueError("objective=grpo needs a reward: reward=exact_answer|keyword|length")
        if group_size < 2:
            raise ValueError(f"objective.group_size must be >= 2 (advantages compare a group), got {group_size}")
        self.reward, self.decoder, self.group_size = reward, decoder, group_size
        self.max_new_tokens, self.beta, self.clip = max_new_tokens, beta, clip
        self.seed, self.rollouts = seed, 0  # rollout i samples with seed + i (repeatable runs)
        self.ref: list[nn.Module] = []  # frozen starting model, not trained or saved
        self.tokenizer = None

    def setup(self, model: nn.Module, tokenizer: Any) -> None:
        self.ref = [copy.deepcopy(model).eval().requires_grad_(False)]
        self.tokenizer = tokenizer

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """Sample ``group_size`` responses per prompt, score them, and return what the loss
        reads: the sequences, their response labels, advantages and reference log-probs."""
        rollout = scored_rollout(model, self.ref[0], self.decoder, self.tokenizer, self.reward, batch,
                                 repeat=self.group_size, max_new_tokens=self.max_new_tokens,
                                 seed=None if self.seed is None else self.seed + self.rollouts)
        self.rollouts += 1
        return {**rollout, "advantages": group_advantages(rollout["rewards"], self.group_size)[:, None]}

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch["sequences"]  # group_size consecutive rows per prompt

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        rewards, adv, ref_logp = batch["rewards"], batch["advantages"], batch["ref_logp"]
        logp, mask = token_logprobs(out.logits, batch["response_labels"])
        ratio = torch.exp(logp - logp.detach())  # pi / pi_old: 1 in value, grad of log pi
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = (-surrogate + self.beta * kl) * mask
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        metrics = {"reward": rewards.mean(), "reward_std": rewards.std(),
                   "response_tokens": batch["response_lengths"].mean(),
                   "kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()}
        return Loss(loss, metrics, measure=-rewards.mean())  # val_loss: minus the mean reward
