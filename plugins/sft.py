"""Supervised fine-tuning (``objective=sft``, with ``data=instructions``): next-token
cross-entropy on the response tokens only -- the data's labels are -100 on the
prompt (and padding), so prompt positions contribute no loss and no gradient.
Samples are padded, not packed (see chat_data.py)."""

from __future__ import annotations

from llmzoo.interfaces import Batch, Loss, ModelOutput, summed
from llmzoo.losses import label_count, next_token_loss


class SFT:
    """loss = mean CE over labelled (response) tokens + aux_loss_weight * the blocks' aux loss."""

    needs = frozenset({"input_ids", "labels"})

    def __init__(self, aux_loss_weight: float = 1.0):
        self.aux_loss_weight = aux_loss_weight

    def weight(self, batch: Batch):
        return label_count(batch["labels"])

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        ce, n = next_token_loss(out.logits, batch["labels"])
        loss = ce if out.aux_loss is None else ce + self.aux_loss_weight * out.aux_loss
        return Loss(loss, {"ce": ce.detach(), "tokens": summed(n.float())}, measure=ce.detach())
