"""Causal language modelling objective (``objective=clm``): next-token cross-entropy
with an ignore index, optional z-loss on the log-partition, plus the blocks' aux loss."""

from __future__ import annotations

from llmzoo.interfaces import IGNORE_INDEX, Batch, Loss, ModelOutput, summed
from llmzoo.losses import label_count, next_token_loss

__all__ = ["CausalLM", "next_token_loss"]


class CausalLM:
    """loss = CE + z_loss * mean(logsumexp(logits)^2) + aux_loss_weight * aux_loss,
    means over the labelled next-token positions (``weight``)."""

    needs = frozenset({"input_ids"})

    def __init__(self, z_loss: float = 0.0, aux_loss_weight: float = 1.0):
        self.z_loss, self.aux_loss_weight = z_loss, aux_loss_weight

    def weight(self, batch: Batch):
        return label_count(batch.get("labels", batch["input_ids"]))

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        labels = batch.get("labels", batch["input_ids"])
        ce, n_tokens = next_token_loss(out.logits, labels)
        loss, metrics = ce, {"ce": ce.detach(), "tokens": summed(n_tokens.float())}
        if self.z_loss:
            mask = labels[:, 1:] != IGNORE_INDEX
            z = (out.logits[:, :-1].float().logsumexp(-1) ** 2)[mask].mean()
            loss = loss + self.z_loss * z
            metrics["z_loss"] = z.detach()
        if out.aux_loss is not None:
            loss = loss + self.aux_loss_weight * out.aux_loss
            metrics["aux_loss"] = out.aux_loss.detach()
        return Loss(loss, metrics, measure=ce.detach())
