"""objective=example_simpo: Simple Preference Optimization (Meng et al. 2024), with data=preferences.

No reference model: the implicit reward of a response is its average log-probability
per token, scaled by beta, and the chosen one must win by a margin gamma:
    loss = -log sigmoid(beta * (mean log pi(y_w|x) - mean log pi(y_l|x)) - gamma)
llmzoo runs the model on ``inputs(batch)`` (chosen and rejected of each pair in
consecutive rows) and calls ``loss(out, batch)``; that is the whole contract.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from llmzoo import hookimpl
from llmzoo.interfaces import IGNORE_INDEX, Loss
from llmzoo.shared.losses import pair_rows, sequence_logprobs


class SimPO:
    needs = frozenset({"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})

    def __init__(self, beta: float = 2.0, gamma: float = 0.5):
        self.beta, self.gamma = beta, gamma

    @staticmethod
    def check(node, cfg) -> list[str]:
        beta = node.get("beta")
        return [] if isinstance(beta, (int, float)) and beta > 0 else [f"beta={beta!r} is not allowed: a number > 0"]

    def inputs(self, batch):
        return pair_rows(batch)[0]

    def loss(self, out, batch) -> Loss:
        labels = pair_rows(batch)[1]
        mean_logp = sequence_logprobs(out.logits, labels) / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        margin = self.beta * (mean_logp[0::2] - mean_logp[1::2])
        loss = -F.logsigmoid(margin - self.gamma).mean()
        return Loss(loss, {"margin": margin.detach().mean(), "accuracy": (margin > 0).float().mean()})


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
