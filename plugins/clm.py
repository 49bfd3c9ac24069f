"""Causal language modelling objective (``objective=clm``): next-token cross-entropy
with an ignore index, optional z-loss on the log-partition, plus the blocks' aux loss.

``fused_ce=true`` never builds the (B, T, V) logits: the model stops at its final hidden
states and the loss forms the logits ``fused_chunk`` tokens at a time, with their gradient
(``llmzoo.shared.losses.linear_cross_entropy``; Liger-Kernel's fused Triton kernel on CUDA with
``fused_backend: auto``). Same loss and gradients within float32 rounding; the saving is
the logits and their gradient, 2 x B x T x V x 4 bytes (1 GiB at 8 x 1024 tokens and a
32k vocabulary)."""

from __future__ import annotations

from llmzoo.interfaces import Batch, Loss, ModelOutput, summed
from llmzoo.shared.losses import FusedCEOption, label_count, next_token_ce, next_token_loss

__all__ = ["CausalLM", "next_token_loss"]


class CausalLM(FusedCEOption):
    """loss = CE + z_loss * mean(logsumexp(logits)^2) + aux_loss_weight * aux_loss,
    means over the labelled next-token positions (``weight``)."""

    needs = frozenset({"input_ids"})

    def __init__(self, z_loss: float = 0.0, aux_loss_weight: float = 1.0, fused_ce: bool = False,
                 fused_backend: str = "auto", fused_chunk: int = 1024):
        self.z_loss, self.aux_loss_weight = z_loss, aux_loss_weight
        self.init_fused(fused_ce, fused_backend, fused_chunk)

    def weight(self, batch: Batch):
        return label_count(batch.get("labels", batch["input_ids"]))

    def loss(self, out: ModelOutput, batch: Batch) -> Loss:
        labels = batch.get("labels", batch["input_ids"])
        loss, ce, z, n_tokens = next_token_ce(out, labels, z_loss=self.z_loss, fused=self.fused)
        metrics = {"ce": ce, "tokens": summed(n_tokens.float())}
        if z is not None:
            metrics["z_loss"] = z
        if out.aux_loss is not None:
            loss = loss + self.aux_loss_weight * out.aux_loss
            metrics["aux_loss"] = out.aux_loss.detach()
        return Loss(loss, metrics, measure=ce)
