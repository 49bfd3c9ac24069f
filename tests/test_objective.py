"""The clm objective against the cross-entropy written out by hand."""

import torch

from llmzoo.interfaces import ModelOutput
from llmzoo_plugins.clm import CausalLM
from llmzoo.losses import run_objective


class FixedLogits(torch.nn.Module):
    def __init__(self, logits, aux=None):
        super().__init__()
        self.logits, self.aux = logits, aux

    def forward(self, ids):
        return ModelOutput(self.logits, self.aux)


def manual_ce(logits, labels):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t].double()
            total += (torch.logsumexp(row, 0) - row[y]).item()
            n += 1
    return total / n, n


def test_clm_loss_with_ignore_index_and_z_loss_and_aux():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, 2] = labels[1, 5] = -100
    ce, n = manual_ce(logits, labels)
    out = run_objective(FixedLogits(logits), CausalLM(), {"input_ids": ids, "labels": labels})
    assert abs(out.value.item() - ce) < 1e-5 and int(out.metrics["tokens"].value) == n

    lse = torch.stack([logits[b, t].logsumexp(0) for b in range(2) for t in range(5) if labels[b, t + 1] != -100])
    aux = torch.tensor(0.25)
    out = run_objective(FixedLogits(logits, aux), CausalLM(z_loss=1e-2, aux_loss_weight=0.5),
                        {"input_ids": ids, "labels": labels})
    expected = ce + 1e-2 * (lse ** 2).mean().item() + 0.5 * 0.25
    assert abs(out.value.item() - expected) < 1e-5


def test_labels_default_to_input_ids():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(1, 4, 5, generator=g), torch.randint(0, 5, (1, 4), generator=g)
    out = run_objective(FixedLogits(logits), CausalLM(), {"input_ids": ids})
    assert abs(out.value.item() - manual_ce(logits, ids)[0]) < 1e-5
