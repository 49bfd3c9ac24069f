"""Direct Preference Optimization (``objective=dpo``, with ``data=preferences``;
Rafailov et al. 2023), with the conservative (label-smoothed) variant and IPO.

With log-ratios against a frozen reference model,
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
the losses are
    sigmoid (DPO)   -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo             (h - 1 / (2 * beta))^2            (Azar et al. 2023; per-token means)
where log pi(y|x) sums the response tokens' log-probabilities (IPO uses their mean).

The reference is the model as training starts (``init_from``: the SFT run), frozen;
or ``reference: <run folder or .ckpt>``. With ``precompute_reference: true`` its
log-probs of every pair are computed once before training and the model is dropped. Metrics: rewards beta * (log pi - log ref)
of chosen and rejected, their margin, and the accuracy (chosen reward > rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmzoo.api import frozen_reference
from llmzoo.config import node_class
from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss, ModelOutput
from llmzoo.shared.losses import pair_rows, sequence_logprobs

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
                 reference: str | None = None, precompute_reference: bool = False):
        super().__init__()
        if loss_type not in LOSSES:
            raise ValueError(f"objective.loss_type={loss_type!r} is not one of {list(LOSSES)}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if beta <= 0:
            raise ValueError(f"objective.beta must be > 0, got {beta}")
        self.beta, self.loss_type, self.label_smoothing, self.reference_path = beta, loss_type, label_smoothing, reference
        self.ref: list[nn.Module] = []  # a list: the frozen copy is neither trained nor saved
        self.precompute_reference = precompute_reference
        self.cache: dict[tuple, tuple[float, float]] | None = None  # pair -> reference log-probs

    def setup(self, model: nn.Module, tokenizer=None) -> None:
        self.ref = [frozen_reference(model, self.reference_path)]

    def inputs(self, batch: Batch) -> torch.Tensor:
        return pair_rows(batch)[0]

    def pair_logprobs(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs (B,) of chosen and rejected from the logits of ``inputs(batch)``."""
        labels = pair_rows(batch)[1]
        logp = sequence_logprobs(logits, labels, mean=self.loss_type == "ipo")  # IPO: average log-likelihoods
        return logp[0::2], logp[1::2]

    def logprobs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair_logprobs(model(self.inputs(batch)).logits, batch)

    @staticmethod
    def keys(batch: Batch) -> list[tuple]:
        """One hashable key per pair: its chosen and rejected tokens up to their last label."""
        out = []
        for i in range(len(batch["chosen_input_ids"])):
            key = []
            for side in ("chosen", "rejected"):
                n = int((batch[f"{side}_labels"][i] != IGNORE_INDEX).nonzero().max()) + 1
                key.append(tuple(batch[f"{side}_input_ids"][i, :n].tolist()))
            out.append(tuple(key))
        return out

    @torch.no_grad()
    def precompute(self, batches) -> None:
        """Reference log-probs of every pair, once; then the reference model is dropped
        (``precompute_reference: true`` -- one model in memory while training)."""
        ref, self.cache = self.ref[0], {}
        for batch in batches:
            rc, rr = self.logprobs(ref, batch)
            self.cache.update(zip(self.keys(batch), zip(rc.tolist(), rr.tolist())))
        self.ref = []

    def on_fit_start(self, module) -> None:
        """Called by the trainer's module before training: precompute if configured."""
        if not self.precompute_reference or self.cache is not None:
            return
        device = module.device
        self.ref[0].to(device)
        self.precompute({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                        for batch in module.trainer.datamodule.every_batch())

    @staticmethod
    def check(node, cfg) -> list[str]:
        if node.get("precompute_reference") and not callable(getattr(node_class(cfg.get("data")), "every_batch", None)):
            return ["precompute_reference=true needs a data module with every_batch() (data=preferences has one)"]
        return []

    def reference_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            try:
                found = [self.cache[k] for k in self.keys(batch)]
            except KeyError as e:
                raise KeyError("DPO: a preference pair without a precomputed reference log-prob (was the "
                               "data changed after precompute?)") from e
            rc, rr = torch.tensor(found, device=batch["chosen_input_ids"].device).unbind(-1)
            return rc, rr
        if not self.ref:
            raise RuntimeError("DPO has no reference model: call setup(model) first (llmzoo.train does)")
        ref = self.ref[0].to(batch["chosen_input_ids"].device)
        with torch.no_grad():
            return self.logprobs(ref, batch)

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        pc, pr = self.pair_logprobs(out.logits, batch)
        rc, rr = self.reference_logprobs(batch)
        losses = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)
        chosen, rejected = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        return Loss(losses.mean(), {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                                    "reward_margin": (chosen - rejected).mean(),
                                    "reward_accuracy": (chosen > rejected).float().mean(),
                                    "logp_chosen": pc.detach().mean()})
