"""Parameter-efficient fine-tuning with Hugging Face ``peft`` (``peft=lora``).

LoRA adds a low-rank update B A (rank r, scaled by alpha / r) beside each chosen linear
layer of the blocks and trains only A and B: the base weights stay frozen, so a
fine-tune stores and moves a few megabytes. B starts at zero, so training starts from
the base model exactly. Targets are derived from the blocks: every ``nn.Linear`` inside
them (attention q/k/v/out, MLP gate/up/down, Mamba's projections) except the MoE
routers, or the names listed in ``targets``. The run folder keeps the full weights
(what ``load_run`` and resuming read) and the adapter alone in peft's format
(``adapter/``); ``llmzoo merge-adapter`` and ``llmzoo export-hf`` fold B A into the base
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn


class LoRA:
    """``peft=lora``: r, alpha, dropout; ``targets`` (names or name endings of linear
    layers inside the blocks, e.g. [mixer.q, mixer.v]); null: all of them but ``exclude``."""

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] | None = None,
                 exclude: Sequence[str] = ("router",)):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets, self.exclude = list(targets) if targets else None, tuple(exclude)

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]:
        problems = []
        if not (isinstance(node.get("r"), int) and node.get("r") > 0):
            problems.append(f"r={node.get('r')!r}: the adapter rank, an integer >= 1")
        if not 0 <= float(node.get("dropout", 0.0)) < 1:
            problems.append(f"dropout={node.get('dropout')!r}: a probability in [0, 1)")
        return problems

    def target_names(self, model: nn.Module) -> list[str]:
        names = []
        for name, m in model.named_modules():
            if not (name.startswith("blocks.") and isinstance(m, nn.Linear)):
                continue
            if self.targets is not None:
                if any(name == t or name.endswith("." + t) for t in self.targets):
                    names.append(name)
            elif name.rsplit(".", 1)[-1] not in self.exclude:
                names.append(name)
        if not names:
            raise ValueError(f"peft: no linear layer inside the blocks matches targets={self.targets}")
        return names

    def config(self, names: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names)

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the adapters in place and freeze everything else; returns ``model``."""
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(self.config(self.target_names(model)), model)
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
        return model

    def save(self, model: nn.Module, folder: str | Path) -> None:
        """The adapter alone, in peft's format (adapter_config.json, adapter_model.safetensors)."""
        from peft import get_peft_model_state_dict
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        self.config([n for n, m in model.named_modules() if isinstance(m, LoraLayer)]).save_pretrained(str(folder))

    @staticmethod
    def merge(model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight and put the plain layers back (in place)."""
        from peft.tuners.lora import LoraLayer

        for name, m in list(model.named_modules()):
            if isinstance(m, LoraLayer):
                m.merge()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
        return model

