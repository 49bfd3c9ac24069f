"""Reward model (``objective=reward``, with ``data=preferences``): a scalar head on the
language model's last hidden state, trained with the Bradley-Terry loss
    loss = -log sigmoid(r(x, y_w) - r(x, y_l))
where r reads the final norm's output at the sequence's last token. Metrics: accuracy
(r_w > r_l) and the mean margin. The head is saved with the run (objective.safetensors);
``RewardModel.score(model, ids)`` rates sequences, e.g. as a reward for RL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss


class RewardModel(nn.Module):
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self):
        super().__init__()
        self.head: nn.Linear | None = None

    def setup(self, model: nn.Module) -> None:
        if self.head is None:
            self.head = nn.Linear(model.dim, 1).to(model.embedding.weight.device)
            nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def score(self, model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (B, T), last (B,) index of each row's final token -> rewards (B,)."""
        hidden = model(ids).hidden
        return self.head(hidden[torch.arange(len(ids), device=ids.device), last]).squeeze(-1).float()

    def __call__(self, model: nn.Module, batch: Batch) -> Loss:
        rewards = []
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"]
            last = (labels != IGNORE_INDEX).long().cumsum(-1).argmax(-1)  # the last labelled (eos) position
            rewards.append(self.score(model, batch[f"{side}_input_ids"], last))
        margin = rewards[0] - rewards[1]
        loss = -F.logsigmoid(margin).mean()
        return Loss(loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.detach().mean(),
                           "ce": loss.detach()})
