"""Parameter-efficient fine-tuning with Hugging Face ``peft`` (``peft=lora``, ``peft=qlora``).

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

from llmzoo import hookimpl


class LoRA:
    """``peft=lora``: r, alpha, dropout; ``targets`` (names or name endings of linear
    layers inside the blocks, e.g. [mixer.q, mixer.v]); null: all of them but ``exclude``."""

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] | None = None,
                 exclude: Sequence[str] = ("router",), experts: bool = True):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets, self.exclude, self.experts = list(targets) if targets else None, tuple(exclude), experts

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

    def expert_names(self, model: nn.Module) -> list[str]:
        """The stacked expert weights of MoE blocks ((E, ., .) parameters inside the blocks),
        adapted through peft's ``target_parameters``: a rank-r update per expert."""
        if not self.experts:
            return []
        return [f"{name}.{pname}" for name, m in model.named_modules()
                if name.startswith("blocks.") and not isinstance(m, (nn.Conv1d, nn.Linear))
                for pname, p in m.named_parameters(recurse=False) if p.dim() == 3]

    def config(self, names: list[str], parameters: list[str] | None = None):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names,
                          target_parameters=parameters or None)

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the adapters in place and freeze everything else; returns ``model``."""
        from peft import inject_adapter_in_model

        self.adapted = (self.target_names(model), self.expert_names(model))
        model = inject_adapter_in_model(self.config(*self.adapted), model)
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
        return model

    def save(self, model: nn.Module, folder: str | Path) -> None:
        """The adapter alone, in peft's format (adapter_config.json, adapter_model.safetensors),
        of the model this adapter was applied to."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        self.config(*self.adapted).save_pretrained(str(folder))

    @staticmethod
    def merge(model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight and put the plain layers back (in place)."""
        from peft.tuners.lora import LoraLayer

        # innermost first: peft nests one wrapper per adapted parameter of a module (MoE experts)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        for name, m in sorted(layers, key=lambda nm: -nm[0].count(".")):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base_layer)
        return model



class QLoRA(LoRA):
    """``peft=qlora``: LoRA over base linears stored in 4 bits (NF4, bitsandbytes), as in
    QLoRA -- about 4.5 bits per base weight (one fp32 scale per 64) instead of 16 or 32. Each
    4-bit layer computes in
    ``compute_dtype``. Its state dict holds the dequantized weight, so checkpoints, resume
    and ``load_run`` read and write plain tensors; quantizing them again gives the same
    4-bit codes and scales (no double quantization of the scales), so reloading is exact."""

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] | None = None,
                 exclude: Sequence[str] = ("router",), experts: bool = True, quant_type: str = "nf4",
                 compute_dtype: str = "float32"):
        super().__init__(r, alpha, dropout, targets, exclude, experts)
        self.quant_type, self.compute_dtype = quant_type, compute_dtype

    @staticmethod
    def check(node: Any, cfg: Any) -> list[str]:
        problems = LoRA.check(node, cfg)
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 - missing, or no backend for this machine
            problems.append(f"needs bitsandbytes (pip install bitsandbytes): {type(e).__name__}: {e}")
        if node.get("quant_type", "nf4") not in ("nf4", "fp4"):
            problems.append(f"quant_type={node.get('quant_type')!r} is not one of ['nf4', 'fp4']")
        return problems

    def apply(self, model: nn.Module) -> nn.Module:
        for name in self.target_names(model):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, self.quantized(model.get_submodule(name)))
        return super().apply(model)

    def quantized(self, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb
        import torch

        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=getattr(torch, self.compute_dtype), compress_statistics=False,
                              quant_type=self.quant_type, device="meta")
        q.bias = linear.bias
        # no repacking of the codes for bf16 CPU kernels at inference: the stored codes stay what
        # dequantize and the state dict read
        q.support_avx512bf16_for_cpu = False
        _set_4bit(q, linear.weight.detach())
        q.residual_out = getattr(linear, "residual_out", False)
        q._register_state_dict_hook(_dequantized_state)
        q._register_load_state_dict_pre_hook(_quantize_on_load, with_module=True)
        return q

    @staticmethod
    def merge(model: nn.Module) -> nn.Module:
        """4-bit layers become plain linears holding dequantized weight + B A (exact, no
        re-quantization); then the other adapters merge as LoRA's do."""
        import bitsandbytes as bnb
        from peft.tuners.lora import LoraLayer

        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
            base = m.base_layer
            if isinstance(base, bnb.nn.Linear4bit):
                plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
                plain.weight.data = _dequantize(base) + m.get_delta_weight("default").to(plain.weight.dtype)
                if base.bias is not None:
                    plain.bias.data = base.bias.data.clone()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, plain)
        return LoRA.merge(model)


def _set_4bit(q: nn.Module, weight) -> None:
    import bitsandbytes as bnb

    q.weight = bnb.nn.Params4bit(weight.float().cpu().clone(), requires_grad=False, quant_type=q.weight.quant_type,
                                 compress_statistics=False)
    q.weight = q.weight.to(weight.device if weight.device.type != "meta" else "cpu")  # quantizes


def _dequantize(q: nn.Module):
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def _dequantized_state(module, state, prefix, local_metadata):
    for key in [k for k in state if k.startswith(prefix + "weight.")]:
        del state[key]
    state[prefix + "weight"] = _dequantize(module)


def _quantize_on_load(module, state, prefix, *args):
    key = prefix + "weight"
    if key in state and state[key].is_floating_point():
        _set_4bit(module, state[key])
        state[key] = module.weight.data  # the packed codes: the default load copies them onto themselves


# ----------------------------------------------------------------------------- llmzoo merge-adapter
@hookimpl
def llmzoo_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("merge-adapter", help="a peft=lora run -> a plain run with the adapters folded in",
                              epilog="example: llmzoo merge-adapter run_dir=runs/lora out=runs/lora_merged")
    p.add_argument("settings", nargs="*", metavar="key=value", help="run_dir=<run> and out=<new run folder>")
    p.set_defaults(run=_merge_command)


def _merge_command(args: Any) -> None:
    from omegaconf import OmegaConf

    from llmzoo.api import CONFIG_FILE, TOKENIZER_DIR, load_run, merged, save_final
    from llmzoo.cli import settings
    from llmzoo.errors import UserError

    s = settings(args.settings, {"run_dir", "out"}, {"run_dir", "out"})
    run_dir, out = Path(s["run_dir"]), Path(s["out"])
    run = load_run(run_dir)
    if not run.cfg.get("peft"):
        raise UserError(f"run_dir={run_dir}: the run has no adapters (peft is not set)")
    if (out / CONFIG_FILE).exists():
        raise UserError(f"out={out} already holds a run: choose another folder")
    plain = merged(run)
    out.mkdir(parents=True, exist_ok=True)
    plain.tokenizer.save(out / TOKENIZER_DIR)
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(plain.cfg, resolve=True))
    save_final(out, plain.model, plain.objective)
    print(f"merged the adapters of {run_dir} -> {out}")
