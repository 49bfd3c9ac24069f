"""Building parts from a config, and loading finished runs (the Python API)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence, cast

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .config import target_class
from .errors import CheckpointError, UserError
from .interfaces import (Decoder, DecoderExtras, Objective, ObjectiveExtras, ParallelStrategy, Tokenizer,
                         TokenizerExtras)
from .shared.safe_load import check_dcp_metadata, safe_torch_load, weights_only_loads  # noqa: F401 (re-exported)
from .model import LanguageModel

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"  # written when the objective has weights of its own


def build_tokenizer(cfg: DictConfig) -> Tokenizer:
    """The configured tokenizer (a BPE one may still need ``fit`` on the training text)."""
    return instantiate(cfg.tokenizer, _convert_="all")


def build_blocks(cfg: DictConfig) -> list[nn.Module]:
    """One block per layer, each built from ``cfg.block`` with its ``layer_idx``."""
    return [instantiate(cfg.block, layer_idx=i, _convert_="all") for i in range(cfg.model.n_layers)]


def build_model(cfg: DictConfig, vocab_size: int | None = None, adapters: bool = True) -> LanguageModel:
    """The configured LanguageModel. ``vocab_size`` defaults to ``model.vocab_size``,
    else to the configured tokenizer's. With ``adapters`` the ``peft=`` adapters are
    added (training adds them itself, after loading the starting weights); the
    ``kernels=`` option (``llmzoo.interfaces.Kernels``) swaps in its faster forwards."""
    m = cfg.model
    vocab_size = vocab_size or m.get("vocab_size") or build_tokenizer(cfg).vocab_size
    if m.get("pad_vocab_to"):
        vocab_size = -(-vocab_size // m.pad_vocab_to) * m.pad_vocab_to
    model = LanguageModel(vocab_size, m.dim, build_blocks(cfg), max_seq_len=m.max_seq_len,
                          tie_embeddings=m.get("tie_embeddings", False), norm_eps=m.get("norm_eps", 1e-5),
                          init_std=m.get("init_std", 0.02))
    if cfg.get("kernels"):  # llmzoo.interfaces.Kernels: faster forwards, same weights
        model = instantiate(cfg.kernels, _convert_="all").apply(model)
    adapter = build_adapter(cfg) if adapters else None
    return adapter.apply(model) if adapter else model


def build_adapter(cfg: DictConfig):
    """The ``peft=`` adapter (``llmzoo.interfaces.Adapter``), or None."""
    return instantiate(cfg.peft, _convert_="all") if cfg.get("peft") else None


def merged(run: "Run") -> "Run":
    """``run`` with its adapters folded into the base weights (a copy; the run itself
    unchanged), configured without ``peft``; a run without adapters as it is."""
    import copy

    adapter = build_adapter(run.cfg)
    if adapter is None:
        return run
    cfg = copy.deepcopy(run.cfg)
    with open_dict(cfg):
        cfg.peft = None
    return run._replace(model=adapter.merge(copy.deepcopy(run.model)), cfg=cfg)


def build_objective(cfg: DictConfig, model: nn.Module | None = None, tokenizer: Tokenizer | None = None) -> Objective:
    """The configured objective; given the model, its optional ``setup(model, tokenizer)`` runs."""
    objective = instantiate(cfg.objective, _convert_="all")
    setup = ObjectiveExtras.of(objective).setup
    if model is not None and setup is not None:
        setup(model, tokenizer)
    return objective


def build_decoder(cfg: DictConfig, **overrides: Any) -> Decoder:
    node = OmegaConf.merge(cfg.decoder, overrides) if overrides else cfg.decoder
    return instantiate(node, _convert_="all")


def ready_decoder(run: "Run", decoder: Decoder | None = None) -> Decoder:
    """``decoder`` (default: the one ``run.cfg`` configures) after its optional ``setup(run)``."""
    decoder = build_decoder(run.cfg) if decoder is None else decoder
    setup = DecoderExtras.of(decoder).setup
    if setup is not None:
        setup(run)
    return decoder


def prompt_ids(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt (bos for an empty one); with ``chat``, as a user turn of the
    tokenizer's chat template ending where the assistant's answer starts."""
    extras = TokenizerExtras.of(tokenizer)
    if chat:
        if extras.render_chat is None:
            raise UserError(f"chat=true: the tokenizer ({type(tokenizer).__name__}) has no chat format (render_chat)")
        try:
            pieces = [extras.render_chat([{"role": "user", "content": p}], generation_prompt=True) for p in prompts]
        except ValueError as e:  # a template that fails or refuses (a tokenizer's ChatTemplateError)
            raise UserError(f"chat=true: {e}") from None
        return [[tokenizer.bos_id] + [t for text, _ in ps for t in tokenizer.encode(text)] for ps in pieces]
    bos = [tokenizer.bos_id] if extras.add_bos else []
    return [bos + tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]


def generate_ids(run: "Run", decoder: Decoder, ids: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
    """New token ids after each prompt, stopping at the tokenizer's eos; the context must hold them."""
    longest = max(len(i) for i in ids)
    room = run.model.max_seq_len - longest
    if max_new_tokens > room:
        raise UserError(f"the longest prompt has {longest} tokens and the model's context is "
                        f"model.max_seq_len={run.model.max_seq_len}: use max_new_tokens <= {max(room, 0)}")
    return decoder.generate(run.model, ids, max_new_tokens=max_new_tokens, eos_id=run.tokenizer.eos_id)


def generate(run: "Run", decoder: Decoder | None, prompts: Sequence[str], *, max_new_tokens: int = 64,
             chat: bool = False) -> list[str]:
    """Continue each prompt with ``decoder`` (None: the run's configured one): the one path
    from text to text that the CLI, training samples and benchmarks share.

        run = llmzoo.load_run("runs/quickstart")
        llmzoo.generate(run, llmzoo.build_decoder(run.cfg), ["Once upon a time"], max_new_tokens=40)
    """
    decoder = ready_decoder(run, decoder)
    outs = generate_ids(run, decoder, prompt_ids(run.tokenizer, prompts, chat), max_new_tokens=max_new_tokens)
    return [run.tokenizer.decode(o) for o in outs]


def build_strategy(cfg: DictConfig) -> ParallelStrategy:
    return instantiate(cfg.parallel, _convert_="all")


# ----------------------------------------------------------------------------- runs and checkpoints
class Run(NamedTuple):
    model: LanguageModel
    tokenizer: Tokenizer
    cfg: DictConfig
    objective: Any = None  # the trained objective when it has weights (Medusa heads, value head)


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer as {file name: text}, for storing inside a checkpoint."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return {p.name: p.read_text() for p in Path(d).iterdir()}


def tokenizer_from_files(cfg: DictConfig, files: dict[str, str], where: Any = "checkpoint"):
    """The tokenizer stored in a checkpoint. Its file names must be plain names (no
    folders, no ``..``, not absolute): they are written into a folder of our own."""
    import tempfile

    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: the stored tokenizer is not a {{file name: text}} mapping")
    for name, text in files.items():
        if not (isinstance(name, str) and isinstance(text, str)) or name in ("", ".", "..") \
                or Path(name).name != name or "\\" in name or "\0" in name or name.startswith("."):
            raise CheckpointError(f"{where}: refused: stored tokenizer file name {name!r} is not a plain file name "
                                  "(it could write outside the folder it is unpacked into)")
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / name).write_text(text)
        try:
            return target_class(cfg.tokenizer).load(d)
        except (OSError, ValueError, KeyError) as e:  # a missing file, a refused chat template
            raise CheckpointError(f"{where}: the stored tokenizer cannot be loaded: {e}") from None


# ----------------------------------------------------------------------------- safe loading
def check_stored_config(cfg: Any, where: Any) -> DictConfig:
    """A config read from a file (a run's config.yaml, a checkpoint) as a DictConfig,
    refused if any of its ``_target_`` nodes names a class that no installed plugin's
    configs name (instantiating it could call anything: ``torch.load``, ``os.system``),
    or if any value is an interpolation (resolvers run before any allowlist could look).
    Nothing is resolved before this check."""
    from .config import registered_targets

    if not isinstance(cfg, (dict, DictConfig)):
        raise CheckpointError(f"{where}: the stored config is not a mapping")
    allowed = registered_targets()

    def walk(node: Any, key: str) -> None:
        if isinstance(node, str) and "${" in node:
            raise CheckpointError(
                f"{where}: refused: the stored config has an interpolation at {key or 'its root'} ({node[:80]!r}); "
                "llmzoo writes stored configs resolved, and a resolver (oc.create, oc.env, ...) in a file could "
                "build objects or read the environment")
        if isinstance(node, (dict, DictConfig)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for k, v in items:
                if k == "_target_" and v not in allowed:
                    raise CheckpointError(
                        f"{where}: refused: the stored config names {key}._target_={v!r}, which is not a class "
                        "that an installed llmzoo plugin registers (only those may be instantiated from a file)")
                walk(v, f"{key}.{k!s}" if key else str(k))
        elif isinstance(node, (list, tuple)) or OmegaConf.is_list(node):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")

    walk(cfg, "")
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def check_checkpoint_path(path: str | Path) -> None:
    """What Lightning will load on ``ckpt_path=`` is safe: a file is loaded with
    weights_only=True by our CheckpointIO; a sharded folder's index is checked here."""
    path = Path(path)
    if path.is_dir():
        check_dcp_metadata(path)
    elif not path.exists():
        raise CheckpointError(f"ckpt_path={path}: no such file or folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Run:
    """Model, tokenizer and config from one Lightning checkpoint, with no other file. A
    sharded checkpoint (a folder written by several processes, e.g. parallel=fsdp) is
    consolidated into this one process."""
    ckpt = read_sharded(Path(path)) if Path(path).is_dir() else safe_torch_load(path, map_location)
    meta = ckpt.get("llmzoo") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not {"config", "tokenizer", "vocab_size"} <= set(meta) \
            or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an llmzoo checkpoint (no 'llmzoo' entry with config, tokenizer "
                              "and vocab_size, or no state_dict)")
    cfg = check_stored_config(meta["config"], path)
    tokenizer = tokenizer_from_files(cfg, meta["tokenizer"], path)
    model = build_model(cfg, vocab_size=int(meta["vocab_size"]))
    _load_state(model, _prefixed(ckpt["state_dict"], "model."), path)
    objective = build_objective(cfg, model, tokenizer)
    if isinstance(objective, nn.Module) and list(objective.state_dict()):
        _load_state(objective, _prefixed(ckpt["state_dict"], "objective."), path)
        objective.eval()
    return Run(model.eval(), tokenizer, cfg, objective if isinstance(objective, nn.Module) else None)


def read_sharded(folder: Path) -> dict[str, Any]:
    """A distributed (torch.distributed.checkpoint) Lightning checkpoint folder as one dict."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_dcp_metadata(folder)
    with tempfile.TemporaryDirectory() as d, weights_only_loads():
        try:
            dcp_to_torch_save(str(folder), f"{d}/full.pt")
        except Exception as e:  # noqa: BLE001 - a missing or truncated shard
            raise CheckpointError(f"{folder}: sharded checkpoint cannot be read (missing or corrupt shard?): "
                                  f"{type(e).__name__}: {str(e).strip()[:200]}") from None
        ckpt = safe_torch_load(f"{d}/full.pt")
    meta = folder / "meta.pt"  # Lightning's non-tensor entries (loops, our run info)
    if meta.exists():
        ckpt.update(safe_torch_load(meta))
    return ckpt


def _load_state(module: nn.Module, state: dict[str, Any], where: Any) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its weights do not fit the model its config describes: "
                              f"{_load_error(e)}") from None


def _load_safetensors(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(module, str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model config.yaml describes: "
                              f"{_load_error(e)}") from None


def _load_error(e: Exception, limit: int = 1500) -> str:
    """torch's load_state_dict error on one line, whole (missing and unexpected keys, shapes)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_any(path: str | Path) -> Run:
    """A run from whatever a user names: a path a plugin resolves (``llmzoo_load_run``,
    e.g. ``hf:<folder>``), a run folder (its final weights, else last.ckpt) or a ``.ckpt`` file."""
    run = load_foreign(path)
    return run if run is not None else load_local(path)


def load_foreign(path: str | Path) -> Run | None:
    """The run a plugin's ``llmzoo_load_run`` makes of ``path`` (a scheme core does not
    know), or None. Such a run brings its own model, block and tokenizer config."""
    from .plugins import get_plugin_manager

    return get_plugin_manager().hook.llmzoo_load_run(path=str(path))


def load_local(path: str | Path) -> Run:
    """A run folder, a ``.ckpt`` file or a sharded checkpoint folder (``.metadata`` inside)."""
    path = Path(path)
    if path.is_file() or (path / ".metadata").is_file():
        return load_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run folder or a .ckpt file")
    return load_run(path)


def load_run(run_dir: str | Path, checkpoint: str | None = None) -> Run:
    """Model, tokenizer and config of a run folder.

    ``checkpoint``: None (the final ``model.safetensors``, else ``checkpoints/last.ckpt``),
    ``"last"``, ``"best"`` or a path to a ``.ckpt`` file.
    """
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
            raise CheckpointError(f"{ckpt} does not exist (checkpoints there: {found or 'none'})")
        return load_checkpoint(ckpt)
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir} is not an llmzoo run folder (no {CONFIG_FILE})")
    try:
        stored = OmegaConf.load(run_dir / CONFIG_FILE)
        meta = json.loads((run_dir / "model.json").read_text())
        vocab_size = int(meta["vocab_size"])
    except Exception as e:  # noqa: BLE001 - yaml/json syntax, a missing file or key
        raise CheckpointError(f"{run_dir}: broken run folder ({type(e).__name__}: {e})") from None
    cfg = check_stored_config(stored, run_dir / CONFIG_FILE)
    try:
        tokenizer = target_class(cfg.tokenizer).load(run_dir / TOKENIZER_DIR)
    except (OSError, ValueError, KeyError) as e:  # a missing file, a refused chat template
        raise CheckpointError(f"{run_dir / TOKENIZER_DIR}: the tokenizer cannot be loaded: {e}") from None
    model = build_model(cfg, vocab_size=vocab_size)
    _load_safetensors(model, weights)
    objective = None
    if (run_dir / OBJECTIVE_FILE).exists():  # an objective with weights: an nn.Module
        objective = cast(nn.Module, build_objective(cfg, model, tokenizer))
        _load_safetensors(objective, run_dir / OBJECTIVE_FILE)
        objective.eval()
    return Run(model.eval(), tokenizer, cfg, objective)


def save_final(run_dir: Path, model: LanguageModel, objective: Objective | None = None) -> None:
    """Final weights as safetensors plus the vocabulary size needed to rebuild the model;
    the objective's own weights (if any) beside them."""
    from safetensors.torch import save_model

    from .errors import NonFiniteError

    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"the final weights hold NaN/inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
                             f"{run_dir / WEIGHTS_FILE} was not written")
    save_model(model, str(run_dir / WEIGHTS_FILE))
    if isinstance(objective, nn.Module) and list(objective.state_dict()):
        save_model(objective, str(run_dir / OBJECTIVE_FILE))
    (run_dir / "model.json").write_text(json.dumps({"vocab_size": model.vocab_size,
                                                    "parameters": model.num_parameters()}))


def frozen_reference(model: nn.Module, path: str | None = None) -> nn.Module:
    """The frozen model a loss compares against: ``path`` (a run folder, ``.ckpt`` or
    ``hf:<folder>``, loaded without running code) or a copy of ``model`` as training starts."""
    ref: nn.Module = load_any(path).model if path else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)
