"""Hugging Face ``transformers`` folders in and out.

A plugin like any other: it resolves the ``hf:`` path scheme (``llmzoo_load_run``) and adds
the ``llmzoo import-hf`` and ``llmzoo export-hf`` commands (``llmzoo_commands``).
``from_hf(folder)`` / ``llmzoo import-hf`` / ``init_from=hf:<folder>`` read config.json,
the safetensors weights (one file or shards with an index) and the tokenizer folder;
``export_hf(run, out)`` / ``llmzoo export-hf`` write a folder that
``AutoModelForCausalLM.from_pretrained`` (and so vLLM, TGI, ``transformers serve``) load.
What each model family's fields and tensors mean comes from the converters plugins
return from the ``llmzoo_hf_architectures`` hook (the built-in ones: llmzoo_plugins.hf_models).

Nothing here runs code from the folder: weights are safetensors only (``.bin`` pickles
are refused), configs are JSON, and a chat template is rendered in Jinja's sandbox.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from llmzoo import hookimpl
from llmzoo.api import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, Run, build_model, merged
from llmzoo.config import ConfigError, compose, validate_config
from llmzoo.errors import CheckpointError, UserError
from llmzoo.interfaces import HFUnsupported
from llmzoo.plugins import get_plugin_manager

log = logging.getLogger(__name__)

JSON_TOKENIZER = "llmzoo_plugins.tokenizers.JsonTokenizer"  # the built-in tokenizer=file
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def architectures() -> list[Any]:
    return [a for found in get_plugin_manager().hook.llmzoo_hf_architectures() for a in found]


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def architecture_for(hf: dict) -> Any:
    mt = hf.get("model_type")
    found = [a for a in architectures() if mt in a.model_types]
    if not found:
        known = sorted({t for a in architectures() for t in a.model_types})
        raise HFUnsupported(f"config.json model_type={mt!r}: no converter (known: {', '.join(known)})")
    return found[0]


class Weights:
    """The tensors of a folder's safetensors files, read one at a time (memory-mapped):
    ``weights(name) -> Tensor``, ``weights.has(name)``."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS_FILE).is_file():
            files, weight_map = [WEIGHTS_FILE], None
        else:
            pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                                  + (f" (found {pickles[:3]}: pickle files can run code when loaded and are "
                                     "refused; convert them to safetensors first)" if pickles else ""))
        self.handles = {}
        for f in files:
            if Path(f).name != f:
                raise CheckpointError(f"{index}: refused: shard name {f!r} is not a plain file name")
            self.handles[f] = safe_open(str(folder / f), "pt")
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}
        if weight_map and set(weight_map) - set(self.where):
            missing = sorted(set(weight_map) - set(self.where))
            raise CheckpointError(f"{index}: names tensors its shards do not hold: {missing[:3]}")
        self.folder = folder

    def has(self, name: str) -> bool:
        return name in self.where

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self.handles[self.where[name]].get_tensor(name)


# ----------------------------------------------------------------------------- import
def import_config(folder: str | Path, max_seq_len: int | None = None) -> tuple[Any, Any, dict]:
    """(llmzoo config, converter, config.json) of a Hugging Face folder."""
    folder = Path(folder)
    hf = read_config(folder)
    arch = architecture_for(hf)
    nodes = arch.import_config(hf, max_seq_len)
    cfg = compose("train", [], validate=False)
    OmegaConf.set_struct(cfg, False)
    cfg.model, cfg.block = nodes["model"], nodes["block"]
    cfg.tokenizer = tokenizer_node(folder, hf)
    cfg.init_from = None
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise HFUnsupported(f"{folder}: the imported config is refused: {e}") from None
    return cfg, arch, hf


def tokenizer_node(folder: Path, hf: dict) -> dict:
    """The ``tokenizer=file`` node for the folder's tokenizer.json, with the special
    tokens, BOS rule and chat template of its tokenizer_config.json."""
    if not (folder / "tokenizer.json").is_file():
        raise HFUnsupported(f"{folder}: no tokenizer.json (only fast tokenizers are read; save the tokenizer with "
                            "transformers' PreTrainedTokenizerFast)")
    tc_file = folder / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    vocab = json.loads((folder / "tokenizer.json").read_text())
    by_id = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}

    def token(key: str) -> str | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is None and isinstance(hf.get(f"{key}_id"), int):
            v = by_id.get(hf[f"{key}_id"])
        return v

    eos = token("eos_token")
    if eos is None:
        raise HFUnsupported(f"{folder}: no eos_token in tokenizer_config.json or config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return {"_target_": JSON_TOKENIZER, "path": str(folder.resolve()), "bos_token": token("bos_token") or eos,
            "eos_token": eos, "pad_token": token("pad_token") or eos, "chat_template": template,
            "add_bos": bool(tc.get("add_bos_token", False))}


def from_hf(folder: str | Path, *, max_seq_len: int | None = None, dtype: str = "float32") -> Run:
    """A Hugging Face folder as a ``Run`` (model, tokenizer, config). The model is made
    on the meta device and filled one tensor at a time, so peak memory is one copy of the
    weights (in ``dtype``) plus the largest tensor."""
    from hydra.utils import instantiate

    folder = Path(folder)
    cfg, arch, hf = import_config(folder, max_seq_len)
    if dtype not in DTYPES:
        raise HFUnsupported(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    try:  # the tokenizer checks its chat template: refused before any weight is read
        tokenizer = instantiate(cfg.tokenizer, _convert_="all")
    except Exception as e:  # noqa: BLE001 - hydra wraps the tokenizer's ValueError
        cause = e.__cause__ or e
        raise HFUnsupported(f"{folder}: the chat template is refused: {cause}" if "chat template" in str(cause)
                            else f"{folder}: the tokenizer cannot be made: {cause}") from None
    weights = Weights(folder)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=hf["vocab_size"])
    model = model.to(DTYPES[dtype]).to_empty(device="cpu")
    model.tie_weights()  # to_empty made the embedding and a tied head two tensors again
    for m in model.modules():  # buffers (RoPE tables) and parameters the checkpoint may not hold
        if m is not model and hasattr(m, "reset_extra_parameters"):
            m.reset_extra_parameters()
    state, done = model.state_dict(keep_vars=True), set()
    with torch.no_grad():
        for name, t in arch.import_weights(hf, weights, len(model.blocks), list(state)):
            if tuple(t.shape) != tuple(state[name].shape):
                raise CheckpointError(f"{folder}: {name}: shape {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(state[name].shape)} from its config.json")
            state[name].copy_(t)
            done.add(name)
    if set(state) - done:
        raise CheckpointError(f"{folder}: the converter filled no value for {sorted(set(state) - done)[:5]}")
    if tokenizer.vocab_size > model.vocab_size:
        raise HFUnsupported(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json "
                            f"vocab_size={model.vocab_size}")
    return Run(model.eval(), tokenizer, cfg)


def import_hf(folder: str | Path, run_dir: str | Path, *, max_seq_len: int | None = None,
              dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a Hugging Face folder as an llmzoo run folder (what ``load_run`` reads)."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists() and not overwrite:
        raise CheckpointError(f"run_dir={run_dir} already holds a run: choose another folder or overwrite=true")
    run = from_hf(folder, max_seq_len=max_seq_len, dtype=dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.tokenizer.save(run_dir / TOKENIZER_DIR)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    save_model(run.model, str(run_dir / WEIGHTS_FILE))
    (run_dir / "model.json").write_text(json.dumps({"vocab_size": run.model.vocab_size,
                                                    "parameters": run.model.num_parameters(),
                                                    "imported_from": str(Path(folder).resolve())}))
    return run_dir


# ----------------------------------------------------------------------------- export
def export_hf(run: Run, out: str | Path, *, dtype: str | None = None) -> Path:
    """Write ``run`` as a Hugging Face folder: config.json, generation_config.json,
    model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json with the
    chat template). Refuses, naming why, a run whose blocks have no ``transformers`` family."""
    from safetensors.torch import save_file

    out = Path(out)
    run = merged(run)  # adapters (peft=lora) folded into the weights
    found = [a for a in architectures() if a.exports(run.cfg)]
    if not found:
        raise HFUnsupported(f"block {run.cfg.block._target_}: no transformers counterpart (exported: dense, moe "
                            "without shared experts, mamba and mamba2 without MLP)")
    arch, tok = found[0], run.tokenizer
    hf_tok = getattr(tok, "hf_tokenizer", None)
    if hf_tok is None:
        raise HFUnsupported(f"tokenizer {type(tok).__name__} has no hf_tokenizer(): it cannot be written as "
                            "tokenizer.json")
    config = arch.export_config(run.cfg, run.model)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    config.update(ids)
    cast = DTYPES[dtype] if dtype else None
    if cast:
        config["torch_dtype"] = dtype
    tensors = {}
    for name, t in arch.export_weights(run.cfg, run.model.state_dict()):
        t = t.detach().to("cpu")
        tensors[name] = (t.to(cast) if cast else t).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    hf_tok().save(str(out / "tokenizer.json"))
    names = {k: hf_tok().id_to_token(v) for k, v in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                      ("pad_token", tok.pad_id))}
    template = getattr(tok, "chat_template_jinja", None)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": bool(getattr(tok, "add_bos", False)),
        "model_max_length": run.model.max_seq_len, "chat_template": template() if template else None}, indent=2))
    return out



# ----------------------------------------------------------------------------- hooks
SCHEME = "hf:"


@hookimpl
def llmzoo_load_run(path: str) -> Run | None:
    """``hf:<folder>``: a Hugging Face folder as a run (``init_from=``, ``load_any``, DPO's
    reference model); it brings its own model, block and tokenizer."""
    return from_hf(path[len(SCHEME):]) if isinstance(path, str) and path.startswith(SCHEME) else None


@hookimpl
def llmzoo_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-hf", help="a Hugging Face transformers folder -> an llmzoo run folder",
        description="Read config.json, the safetensors weights and tokenizer.json of a Llama, Mistral, Qwen2/3, "
        "Mixtral, Mamba or Mamba-2 folder and write an llmzoo run folder (load_run, llmzoo-generate, init_from= "
        "read it). Fine-tune directly with llmzoo-train init_from=hf:<folder>.",
        epilog="example: llmzoo import-hf ~/models/llama run_dir=runs/llama max_seq_len=2048")
    p.add_argument("folder", help="the Hugging Face model folder")
    p.add_argument("settings", nargs="*", metavar="key=value", help=f"run_dir=<out> (required), max_seq_len=N "
                   f"(default 4096), dtype={'|'.join(DTYPES)}, overwrite=true")
    p.set_defaults(run=_import_command)
    p = subparsers.add_parser(
        "export-hf", help="an llmzoo run -> a Hugging Face transformers folder",
        description="Write config.json, model.safetensors and the tokenizer of a run so that transformers' "
        "AutoModelForCausalLM / AutoTokenizer, vLLM, TGI and `transformers serve` load it. Dense, MoE (no shared "
        "experts), Mamba and Mamba-2 (block.mlp=false) runs export.",
        epilog="example: llmzoo export-hf run_dir=runs/quickstart out=exported/quickstart")
    p.add_argument("settings", nargs="*", metavar="key=value",
                   help=f"run_dir=<run> and out=<folder> (required), dtype={'|'.join(DTYPES)}")
    p.set_defaults(run=_export_command)


def _import_command(args: Any) -> None:
    from llmzoo.cli import settings

    s = settings(args.settings, {"run_dir", "max_seq_len", "dtype", "overwrite"}, {"run_dir"})
    if not s.get("max_seq_len", "1").isdigit():
        raise UserError(f"max_seq_len={s['max_seq_len']!r}: expected a positive integer")
    out = import_hf(args.folder, s["run_dir"], max_seq_len=int(s["max_seq_len"]) if "max_seq_len" in s else None,
                    dtype=s.get("dtype", "float32"), overwrite=s.get("overwrite") == "true")
    print(f"imported {args.folder} -> {out} (llmzoo-generate run_dir={out} prompt=...)")


def _export_command(args: Any) -> None:
    from llmzoo.api import load_run
    from llmzoo.cli import settings

    s = settings(args.settings, {"run_dir", "out", "dtype"}, {"run_dir", "out"})
    out = export_hf(load_run(s["run_dir"]), s["out"], dtype=s.get("dtype"))
    print(f"exported {s['run_dir']} -> {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
