"""Odds Ratio Preference Optimization (``objective=orpo`` with ``data=preferences``;
Hong, Lee and Thorne 2024): supervised fine-tuning on the chosen response plus an
odds-ratio penalty on the rejected one, in one stage and without a reference model.

With P(y|x) = exp(mean over the response tokens of log p) and odds(y|x) = P / (1 - P),

    loss = L_SFT + lambda * L_OR
    L_SFT = -mean log p(y_w|x)                       (the chosen response's token NLL)
    L_OR  = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )

per pair, averaged over pairs. log odds = log P - log(1 - P) is computed as
logP - log(-expm1(logP)) so that it stays finite as P -> 1. Metrics: L_SFT, L_OR, the
log odds ratio and the accuracy (chosen odds > rejected odds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmzoo.interfaces import Batch, Loss, ModelOutput
from llmzoo.shared.losses import pair_average_logprobs, pair_rows


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(avg_logp) < 1."""
    return avg_logp - torch.log(-torch.expm1(avg_logp.clamp(max=-1e-6)))


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """Per-pair (loss, L_SFT, L_OR) (B,) from length-normalised log-likelihoods (B,)."""
    sft = -avg_chosen
    odds = -F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))
    return sft + lam * odds, sft, odds


class ORPO:
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self, lam: float = 0.1):
        if lam < 0:
            raise ValueError(f"objective.lam (the odds-ratio weight) must be >= 0, got {lam}")
        self.lam = lam

    def inputs(self, batch: Batch) -> torch.Tensor:
        return pair_rows(batch)[0]

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        chosen, rejected = pair_average_logprobs(out.logits, batch)
        losses, sft, odds = orpo_loss(chosen, rejected, self.lam)
        ratio = (log_odds(chosen) - log_odds(rejected)).detach()
        return Loss(losses.mean(), {"sft_loss": sft.detach().mean(), "odds_ratio_loss": odds.detach().mean(),
                                    "log_odds_ratio": ratio.mean(), "reward_accuracy": (ratio > 0).float().mean()})
