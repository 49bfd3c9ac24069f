"""Building parts from a config, and loading finished runs (the Python API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .model import LanguageModel

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"  # written when the objective has weights of its own


def build_tokenizer(cfg: DictConfig):
    """The configured tokenizer (a BPE one may still need ``fit`` on the training text)."""
    return instantiate(cfg.tokenizer, _convert_="all")


def build_blocks(cfg: DictConfig) -> list[nn.Module]:
    """One block per layer, each built from ``cfg.block`` with its ``layer_idx``."""
    return [instantiate(cfg.block, layer_idx=i, _convert_="all") for i in range(cfg.model.n_layers)]


def build_model(cfg: DictConfig, vocab_size: int | None = None) -> LanguageModel:
    """The configured LanguageModel. ``vocab_size`` defaults to ``model.vocab_size``,
    else to the configured tokenizer's."""
    m = cfg.model
    vocab_size = vocab_size or m.get("vocab_size") or build_tokenizer(cfg).vocab_size
    if m.get("pad_vocab_to"):
        vocab_size = -(-vocab_size // m.pad_vocab_to) * m.pad_vocab_to
    return LanguageModel(vocab_size, m.dim, build_blocks(cfg), max_seq_len=m.max_seq_len,
                         tie_embeddings=m.get("tie_embeddings", False), norm_eps=m.get("norm_eps", 1e-5),
                         init_std=m.get("init_std", 0.02))


def build_objective(cfg: DictConfig, model: nn.Module | None = None, tokenizer: Any = None):
    """The configured objective; given the model, its optional ``setup(model)`` runs
    (``setup(model, tokenizer=...)`` when it takes one: RL objectives decode text)."""
    import inspect

    objective = instantiate(cfg.objective, _convert_="all")
    if model is not None and hasattr(objective, "setup"):
        takes_tokenizer = "tokenizer" in inspect.signature(objective.setup).parameters
        objective.setup(model, **({"tokenizer": tokenizer} if takes_tokenizer else {}))
    return objective


def build_decoder(cfg: DictConfig, **overrides: Any):
    node = OmegaConf.merge(cfg.decoder, overrides) if overrides else cfg.decoder
    return instantiate(node, _convert_="all")


def build_strategy(cfg: DictConfig):
    return instantiate(cfg.parallel, _convert_="all")


# ----------------------------------------------------------------------------- runs and checkpoints
class Run(NamedTuple):
    model: LanguageModel
    tokenizer: Any
    cfg: DictConfig
    objective: Any = None  # the trained objective when it has weights (Medusa heads, value head)


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer as {file name: text}, for storing inside a checkpoint."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return {p.name: p.read_text() for p in Path(d).iterdir()}


def tokenizer_from_files(cfg: DictConfig, files: dict[str, str]):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / name).write_text(text)
        return get_class(cfg.tokenizer._target_).load(d)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Run:
    """Model, tokenizer and config from one Lightning checkpoint, with no other file. A
    sharded checkpoint (a folder written by several processes, e.g. parallel=fsdp) is
    consolidated into this one process."""
    ckpt = read_sharded(Path(path)) if Path(path).is_dir() else \
        torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("llmzoo")
    if meta is None:
        raise ValueError(f"{path}: not an llmzoo checkpoint (no 'llmzoo' entry)")
    cfg = OmegaConf.create(meta["config"])
    tokenizer = tokenizer_from_files(cfg, meta["tokenizer"])
    model = build_model(cfg, vocab_size=meta["vocab_size"])
    model.load_state_dict(_prefixed(ckpt["state_dict"], "model."))
    objective = build_objective(cfg, model, tokenizer)
    if isinstance(objective, nn.Module) and list(objective.state_dict()):
        objective.load_state_dict(_prefixed(ckpt["state_dict"], "objective."))
        objective.eval()
    return Run(model.eval(), tokenizer, cfg, objective if isinstance(objective, nn.Module) else None)


def read_sharded(folder: Path) -> dict[str, Any]:
    """A distributed (torch.distributed.checkpoint) Lightning checkpoint folder as one dict."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (folder / ".metadata").exists():
        raise ValueError(f"{folder}: a folder, but not a sharded checkpoint (no .metadata)")
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(folder), f"{d}/full.pt")
        ckpt = torch.load(f"{d}/full.pt", map_location="cpu", weights_only=False)
    meta = folder / "meta.pt"  # Lightning's non-tensor entries (loops, our run info)
    if meta.exists():
        ckpt.update(torch.load(meta, map_location="cpu", weights_only=False))
    return ckpt


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_any(path: str | Path) -> Run:
    """A run folder (its final weights, else last.ckpt) or a ``.ckpt`` file."""
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder or a .ckpt file")
    return load_run(path)


def load_run(run_dir: str | Path, checkpoint: str | None = None) -> Run:
    """Model, tokenizer and config of a run folder.

    ``checkpoint``: None (the final ``model.safetensors``, else ``checkpoints/last.ckpt``),
    ``"last"``, ``"best"`` or a path to a ``.ckpt`` file.
    """
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    if checkpoint and checkpoint not in ("last", "best"):
        return load_checkpoint(checkpoint)
    weights = run_dir / WEIGHTS_FILE
    if checkpoint is None and not weights.exists():
        checkpoint = "last"
    if checkpoint:
        ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
        if not ckpt.exists():
            found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            raise FileNotFoundError(f"{ckpt} does not exist (checkpoints there: {found or 'none'})")
        return load_checkpoint(ckpt)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not an llmzoo run folder (no {CONFIG_FILE})")
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    tokenizer = get_class(cfg.tokenizer._target_).load(run_dir / TOKENIZER_DIR)
    meta = json.loads((run_dir / "model.json").read_text())
    model = build_model(cfg, vocab_size=meta["vocab_size"])
    load_model(model, str(weights))
    objective = None
    if (run_dir / OBJECTIVE_FILE).exists():
        objective = build_objective(cfg, model, tokenizer)
        load_model(objective, str(run_dir / OBJECTIVE_FILE))
        objective.eval()
    return Run(model.eval(), tokenizer, cfg, objective)


def save_final(run_dir: Path, model: LanguageModel, objective: Any = None) -> None:
    """Final weights as safetensors plus the vocabulary size needed to rebuild the model;
    the objective's own weights (if any) beside them."""
    from safetensors.torch import save_model

    save_model(model, str(run_dir / WEIGHTS_FILE))
    if isinstance(objective, nn.Module) and list(objective.state_dict()):
        save_model(objective, str(run_dir / OBJECTIVE_FILE))
    (run_dir / "model.json").write_text(json.dumps({"vocab_size": model.vocab_size,
                                                    "parameters": model.num_parameters()}))
