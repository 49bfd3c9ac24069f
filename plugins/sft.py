"""Supervised fine-tuning (``objective=sft``, with ``data=instructions``): next-token
cross-entropy on the response tokens only -- the data's labels are -100 on the
prompt (and padding), so prompt positions contribute no loss and no gradient.
Samples are padded, not packed (see chat_data.py). ``fused_ce=true`` computes the loss
from the final hidden states and the head's weight without (B, T, V) logits, and skips
the prompt rows entirely (as objective=clm; ``llmzoo.shared.losses.linear_cross_entropy``)."""

from __future__ import annotations

from llmzoo.interfaces import Batch, Loss, ModelOutput, summed
from llmzoo.shared.losses import FusedCEOption, label_count, next_token_ce


class SFT(FusedCEOption):
    """loss = mean CE over labelled (response) tokens + aux_loss_weight * the blocks' aux loss."""

    needs = frozenset({"input_ids", "labels"})

    def __init__(self, aux_loss_weight: float = 1.0, fused_ce: bool = False, fused_backend: str = "auto",
                 fused_chunk: int = 1024):
        self.aux_loss_weight = aux_loss_weight
        self.init_fused(fused_ce, fused_backend, fused_chunk)

    def weight(self, batch: Batch):
        return label_count(batch["labels"])

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        loss, ce, _, n = next_token_ce(out, batch["labels"], fused=self.fused)
        if out.aux_loss is not None:
            loss = loss + self.aux_loss_weight * out.aux_loss
        return Loss(loss, {"ce": ce, "tokens": summed(n.float())}, measure=ce)
