"""FROZEN plugin package written to llmzoo's published contract 2 (and, for ``EmaBlock``,
the first release's): one implementation of each interface, using the import paths of
that contract (``llmzoo.losses.next_token_loss``, ``llmzoo.decoding.check_prompts``).
tests/compat/test_compat.py installs it and runs it; do not edit it to make a test pass."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmzoo import hookimpl
from llmzoo.decoding import check_prompts  # contract 2 path (llmzoo.shared.decoding since 3)
from llmzoo.losses import next_token_loss  # contract 2 path (llmzoo.shared.losses since 3)
from llmzoo.interfaces import Loss

LLMZOO_CONTRACT = "2"


@hookimpl
def llmzoo_conf_path() -> str:
    return "pkg://llmzoo_compat_v2.conf"


class EmaState:
    """A fixed-size decode state: the running average h (B, D)."""

    def __init__(self, batch_size: int, dim: int, device=None, dtype=None):
        self.h = torch.zeros(batch_size, dim, device=device, dtype=dtype)
        self.pos = 0

    def reset(self) -> None:
        self.h.zero_()
        self.pos = 0

    def reorder(self, index: torch.Tensor) -> None:
        self.h = self.h[index]


class EmaBlock(nn.Module):
    """First-release block: an exponential moving average over time (h_t = a h_{t-1} +
    (1 - a) W x_t) added to the residual stream. It declares only ``recurrent``, as the
    first release's contract allowed (``stateful`` was implied)."""

    capabilities = frozenset({"recurrent"})

    def __init__(self, dim: int, decay: float = 0.9, layer_idx: int = 0):
        super().__init__()
        self.inp, self.out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.decay, self.dim = decay, dim

    def forward(self, x: torch.Tensor, *, state: EmaState | None = None) -> torch.Tensor:
        u = (1 - self.decay) * self.inp(x)
        h = state.h if state is not None else torch.zeros_like(u[:, 0])
        hs = []
        for t in range(x.shape[1]):
            h = self.decay * h + u[:, t]
            hs.append(h)
        if state is not None:
            state.h, state.pos = h, state.pos + x.shape[1]
        return x + self.out(torch.stack(hs, 1))

    def init_state(self, batch_size: int, max_len: int, *, device=None, dtype=None, **kw) -> EmaState:
        return EmaState(batch_size, self.dim, device, dtype)

    def aux_loss(self):
        return None


class CharTokenizer:
    """Bytes as tokens, 3 specials after them."""

    vocab_size, pad_id, bos_id, eos_id = 259, 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "compat_chars.txt").write_text("bytes\n")

    @classmethod
    def load(cls, directory) -> "CharTokenizer":
        return cls()


class NextToken:
    """Next-token cross-entropy through the contract-2 helper."""

    needs = frozenset({"input_ids", "labels"})

    def loss(self, out, batch) -> Loss:
        ce, n = next_token_loss(out.logits, batch["labels"])
        return Loss(ce, {"tokens": float(n)})


class FullForwardGreedy:
    """Greedy decoding by a full forward per token (needs nothing from the blocks)."""

    requires: frozenset[str] = frozenset()

    def generate(self, model, prompts, *, max_new_tokens: int, eos_id=None) -> list[list[int]]:
        check_prompts(prompts)
        outs = []
        for p in prompts:
            ids, new = list(p), []
            for _ in range(max_new_tokens):
                with torch.no_grad():
                    nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                new.append(nxt)
                if nxt == eos_id:
                    break
            outs.append(new)
        return outs


class SingleDevice:
    """The whole model on one device, unchanged."""

    requires: frozenset[str] = frozenset()

    def lightning_strategy(self):
        return "auto"

    def parallelize(self, model, device_mesh):
        return model
