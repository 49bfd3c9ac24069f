"""Kahneman-Tversky Optimization (``objective=kto`` with ``data=preferences``;
Ethayarajh et al. 2024). KTO needs only a desirable/undesirable label per response; a
preference pair gives one of each (chosen desirable, rejected undesirable).

With the implicit reward r(x, y) = log pi(y|x) - log ref(y|x) against a frozen reference
and a reference point z0 (below), the value of a response is
    desirable     v = lambda_D * sigmoid(beta * (r - z0))
    undesirable   v = lambda_U * sigmoid(beta * (z0 - r))
and the loss is lambda_y - v, averaged over the batch's responses (here per pair:
the mean of its desirable and undesirable terms).

z0 estimates KL(pi || ref) as the paper does, from mismatched pairs: prompt i with the
chosen response of pair i + 1 (cyclically within the batch), z0 = max(0, mean of
log pi - log ref over them). It is a constant of the loss (no gradient), so it is
computed once per batch in ``prepare`` with the reference log-probs: every micro-batch of
the step sees the same z0.
"""

from __future__ import annotations

import torch
from torch import nn

from llmzoo.api import frozen_reference
from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss, ModelOutput
from llmzoo.shared.losses import pair_rows, prompt_response_batch, sequence_logprobs


def kto_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, z0: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-pair losses (B,) from sequence log-probabilities (B,) and the reference point z0."""
    desirable = desirable_weight * (1 - torch.sigmoid(beta * ((policy_chosen - ref_chosen) - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - (policy_rejected - ref_rejected))))
    return (desirable + undesirable) / 2


def mismatched_rows(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of prompt i followed by the chosen response of pair (i + 1) mod B."""
    prompts, responses = [], []
    for ids, labels in zip(batch["chosen_input_ids"].tolist(), batch["chosen_labels"].tolist()):
        where = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        prompts.append(ids[:where[0]])
        responses.append(ids[where[0]:where[-1] + 1])
    responses = responses[1:] + responses[:1]
    return prompt_response_batch(prompts, responses, pad_id, batch["chosen_input_ids"].device)


class KTO:
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: str | None = None):
        if beta <= 0:
            raise ValueError(f"objective.beta must be > 0, got {beta}")
        if desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError("objective.desirable_weight and undesirable_weight must be > 0, got "
                             f"{desirable_weight} and {undesirable_weight}")
        self.beta, self.reference_path = beta, reference
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.ref: list[nn.Module] = []  # a list: the frozen copy is neither trained nor saved
        self.pad_id = 0

    def setup(self, model: nn.Module, tokenizer=None) -> None:
        self.ref = [frozen_reference(model, self.reference_path)]
        self.pad_id = getattr(tokenizer, "pad_id", 0)

    def inputs(self, batch: Batch) -> torch.Tensor:
        return pair_rows(batch)[0]

    @torch.no_grad()
    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """The reference's log-probs of chosen and rejected, and z0 (repeated per pair)."""
        if not self.ref:
            raise RuntimeError("KTO has no reference model: call setup(model) first (llmzoo.train does)")
        ref = self.ref[0].to(batch["chosen_input_ids"].device)
        ids, labels = pair_rows(batch)
        logp = sequence_logprobs(ref(ids).logits, labels)
        ids, labels = mismatched_rows(batch, self.pad_id)
        kl = (sequence_logprobs(model(ids).logits, labels) - sequence_logprobs(ref(ids).logits, labels)).mean()
        return {**batch, "ref_chosen": logp[0::2], "ref_rejected": logp[1::2],
                "kto_z0": kl.clamp(min=0).expand(len(ids)).clone()}

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        logp = sequence_logprobs(out.logits, pair_rows(batch)[1])
        pc, pr, rc, rr, z0 = logp[0::2], logp[1::2], batch["ref_chosen"], batch["ref_rejected"], batch["kto_z0"]
        losses = kto_loss(pc, pr, rc, rr, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        chosen, rejected = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        return Loss(losses.mean(), {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                                    "reward_margin": (chosen - rejected).mean(), "kl_z0": z0.mean(),
                                    "reward_accuracy": (chosen > rejected).float().mean()})
