"""Where a model meets its objective: ``run_objective`` and the batch helpers every
strategy uses to split a batch. The token-level helpers objectives share (cross-entropy,
log-probs) moved to ``llmzoo.shared.losses``; their old names here still work, with a
DeprecationWarning, until contract 4."""

from __future__ import annotations

from typing import Any

import torch

from .interfaces import Batch, Loss, Objective, ObjectiveExtras, Segments
from .shared import moved


def model_inputs(objective: Objective, batch: Batch) -> torch.Tensor:
    """The (k * B, T) token ids the model runs on for ``objective`` (default ``input_ids``)."""
    inputs = ObjectiveExtras.of(objective).inputs
    return inputs(batch) if inputs is not None else batch["input_ids"]


def batch_size(batch: Batch) -> int:
    """The number of rows of a batch (of its first tensor)."""
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def batch_rows(batch: Batch, index) -> Batch:
    """Rows ``index`` (a slice or index tensor) of every per-row tensor; other values kept."""
    n = batch_size(batch)
    return {k: v[index] if torch.is_tensor(v) and v.dim() and len(v) == n else v for k, v in batch.items()}


def batch_weight(objective: Objective, batch: Batch) -> torch.Tensor:
    """What the objective's loss averages over (default: the number of batch rows)."""
    weight = ObjectiveExtras.of(objective).weight
    return weight(batch) if weight is not None else torch.tensor(float(batch_size(batch)))


def run_objective(model: Any, objective: Objective, batch: Batch) -> Loss:
    """The one path from a batch to a loss: prepare (optional), run the model, score it.
    An objective whose ``reads`` leaves out ``"logits"`` gets ``hidden`` and ``head_weight``
    instead (``model(ids, logits=False)``): its loss forms the logits itself, in chunks."""
    extras = ObjectiveExtras.of(objective)
    if extras.prepare is not None:
        with torch.no_grad():
            batch = extras.prepare(model, batch)
    kwargs: dict[str, Any] = {} if "logits" in extras.reads else {"logits": False}
    if "doc_ids" in batch:  # packed rows (data.packing=document)
        if extras.inputs is not None:
            raise ValueError(f"{type(objective).__name__} builds its own model inputs: it cannot take packed rows "
                             "(set data.packing=none or concat)")
        kwargs["segments"] = Segments.of(batch["doc_ids"])
    return objective.loss(model(model_inputs(objective, batch), **kwargs), batch)


__getattr__ = moved(__name__, "llmzoo.shared.losses")
