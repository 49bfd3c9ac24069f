"""Supervised fine-tuning (``objective=sft``, with ``data=instructions``): next-token
cross-entropy on the response tokens only -- the data's labels are -100 on the
prompt (and padding), so prompt positions contribute no loss and no gradient.
Samples are padded, not packed (see chat_data.py). ``fused_ce=true`` computes the loss
from the final hidden states and the head's weight without (B, T, V) logits, and skips
the prompt rows entirely (as objective=clm; ``llmzoo.losses.linear_cross_entropy``)."""

from __future__ import annotations

from typing import Any

from llmzoo.interfaces import Batch, Loss, ModelOutput, summed
from llmzoo.losses import fused_ce_problems, label_count, next_token_ce


class SFT:
    """loss = mean CE over labelled (response) tokens + aux_loss_weight * the blocks' aux loss."""

    needs = frozenset({"input_ids", "labels"})
    reads = frozenset({"logits", "aux_loss"})

    def __init__(self, aux_loss_weight: float = 1.0, fused_ce: bool = False, fused_backend: str = "auto",
                 fused_chunk: int = 1024):
        self.aux_loss_weight = aux_loss_weight
        self.fused = {"backend": fused_backend, "chunk_size": fused_chunk}
        self.reads = self.reads_for({"fused_ce": fused_ce})

    @staticmethod
    def reads_for(node: Any) -> frozenset[str]:
        return frozenset({"hidden", "head_weight", "aux_loss"} if node.get("fused_ce") else {"logits", "aux_loss"})

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]:
        return fused_ce_problems(node)

    def weight(self, batch: Batch):
        return label_count(batch["labels"])

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        loss, ce, _, n = next_token_ce(out, batch["labels"], fused=self.fused)
        if out.aux_loss is not None:
            loss = loss + self.aux_loss_weight * out.aux_loss
        return Loss(loss, {"ce": ce, "tokens": summed(n.float())}, measure=ce)
