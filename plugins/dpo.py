"""Direct Preference Optimization (``objective=dpo``, with ``data=preferences``;
Rafailov et al. 2023), with the conservative (label-smoothed) variant and IPO.

With log-ratios against a frozen reference model,
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
the losses are
    sigmoid (DPO)   -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo             (h - 1 / (2 * beta))^2            (Azar et al. 2023; per-token means)
where log pi(y|x) sums the response tokens' log-probabilities (IPO uses their mean).

The reference is the model as training starts (``init_from``: the SFT run), frozen;
or ``reference: <run folder or .ckpt>``. Metrics: rewards beta * (log pi - log ref)
of chosen and rejected, their margin, and the accuracy (chosen reward > rejected).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss
from llmzoo.losses import sequence_logprobs

LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses (B,) from sequence log-probabilities (B,) -- the formulas above."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


class DPO(nn.Module):
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: str | None = None):
        super().__init__()
        if loss_type not in LOSSES:
            raise ValueError(f"objective.loss_type={loss_type!r} is not one of {list(LOSSES)}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if beta <= 0:
            raise ValueError(f"objective.beta must be > 0, got {beta}")
        self.beta, self.loss_type, self.label_smoothing, self.reference_path = beta, loss_type, label_smoothing, reference
        self.ref: list[nn.Module] = []  # a list: the frozen copy is neither trained nor saved

    def setup(self, model: nn.Module) -> None:
        if self.reference_path:
            from llmzoo.api import load_any

            ref = load_any(self.reference_path).model
        else:
            ref = copy.deepcopy(model)
        self.ref = [ref.eval().requires_grad_(False)]

    def logprobs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of chosen and rejected, both in one forward (padded together)."""
        c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        width = max(c_ids.shape[1], r_ids.shape[1])
        ids = torch.cat([F.pad(c_ids, (0, width - c_ids.shape[1])), F.pad(r_ids, (0, width - r_ids.shape[1]))])
        labels = torch.cat([F.pad(batch["chosen_labels"], (0, width - c_ids.shape[1]), value=IGNORE_INDEX),
                            F.pad(batch["rejected_labels"], (0, width - r_ids.shape[1]), value=IGNORE_INDEX)])
        logp = sequence_logprobs(model(ids).logits, labels)
        if self.loss_type == "ipo":  # IPO compares average log-likelihoods
            logp = logp / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return logp.chunk(2)

    def __call__(self, model: nn.Module, batch: Batch) -> Loss:
        if not self.ref:
            raise RuntimeError("DPO has no reference model: call setup(model) first (llmzoo.train does)")
        ref = self.ref[0].to(batch["chosen_input_ids"].device)
        pc, pr = self.logprobs(model, batch)
        with torch.no_grad():
            rc, rr = self.logprobs(ref, batch)
        losses = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)
        chosen, rejected = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        return Loss(losses.mean(), {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                                    "reward_margin": (chosen - rejected).mean(),
                                    "reward_accuracy": (chosen > rejected).float().mean(),
                                    "logp_chosen": pc.detach().mean()})
