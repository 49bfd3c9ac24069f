"""decoder=min_p: min-p sampling (Nguyen et al. 2024) over the blocks' decode-time states.

At each step the tokens whose probability is at least ``min_p`` times the most likely
token's are kept, and one is drawn from them (after ``temperature``). Prompts of
different lengths are decoded one at a time; a seeded generator makes it repeatable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmzoo import hookimpl
from llmzoo.interfaces import STATEFUL


class MinP:
    requires = frozenset({STATEFUL})  # checked at compose time against the blocks' capabilities

    def __init__(self, min_p: float = 0.1, temperature: float = 1.0, seed: int | None = 0):
        self.min_p, self.temperature, self.seed = min_p, temperature, seed

    @staticmethod
    def check(node, cfg) -> list[str]:
        p = node.get("min_p")
        return [] if isinstance(p, (int, float)) and 0 <= p <= 1 else [f"min_p={p!r} is not allowed: a number in [0, 1]"]

    @torch.no_grad()
    def generate(self, model, prompts, *, max_new_tokens, eos_id=None):
        device = next(model.parameters()).device
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        outs = []
        for prompt in prompts:
            states = model.init_states(1, len(prompt) + max_new_tokens, device=device)
            logits = model(torch.tensor([list(prompt)], device=device), states=states).logits[0, -1]
            out = []
            for _ in range(max_new_tokens):
                probs = (logits.float() / max(self.temperature, 1e-6)).softmax(-1)
                probs = probs * (probs >= self.min_p * probs.max())
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                out.append(token)
                if token == eos_id:
                    break
                logits = model(torch.tensor([[token]], device=device), states=states).logits[0, -1]
            outs.append(out)
        return outs


@hookimpl
def llmzoo_conf_path() -> str:
    return str(Path(__file__).parent / "conf")
