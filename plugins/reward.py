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

from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss, ModelOutput
from llmzoo.shared.losses import pair_rows


class RewardModel(nn.Module):
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})
    reads = frozenset({"hidden"})

    def __init__(self):
        super().__init__()
        self.head: nn.Linear | None = None

    def setup(self, model: nn.Module, tokenizer=None) -> None:
        if self.head is None:
            self.head = nn.Linear(model.dim, 1).to(model.embedding.weight.device)
            nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def rate(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), last (B,) index of each row's final token -> rewards (B,)."""
        return self.head(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1).float()

    def score(self, model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (B, T), last (B,) index of each row's final token -> rewards (B,)."""
        return self.rate(model(ids).hidden, last)

    def inputs(self, batch: Batch) -> torch.Tensor:
        return pair_rows(batch)[0]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        labels = pair_rows(batch)[1]
        last = (labels != IGNORE_INDEX).long().cumsum(-1).argmax(-1)  # the last labelled (eos) position
        rewards = self.rate(out.hidden, last)
        margin = rewards[0::2] - rewards[1::2]
        loss = -F.logsigmoid(margin).mean()
        return Loss(loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.detach().mean()})
