"""Composing, validating and listing Hydra configs.

Configs live in ``conf/`` (shipped as the ``llmzoo_conf`` package) and in the
folders plugins return from ``llmzoo_conf_path``; the Hydra search-path plugin
in ``hydra_plugins/llmzoo_searchpath`` joins the latter to every llmzoo app.
"""

from __future__ import annotations

import importlib
import importlib.resources as resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from .plugins import get_plugin_manager

CONF_PACKAGE = "llmzoo_conf"
PRIMARY_CONF = f"pkg://{CONF_PACKAGE}"
GROUPS = ("tokenizer", "model", "block", "objective", "decoder", "parallel", "data", "trainer",
          "experiment", "hparams_search")


class ConfigError(ValueError):
    """A composed config that cannot work. The message lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid llmzoo config:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _asset(name: str) -> str:
    """``${llmzoo.asset:corpus.txt}``: absolute path of a file bundled with llmzoo."""
    return str(resources.files("llmzoo.assets").joinpath(name))


def _job_dirname(num: int, overrides: str, limit: int = 100) -> str:
    """``${llmzoo.job_dirname:${hydra.job.num},${hydra.job.override_dirname}}``: a sweep
    job's folder, ``<job number>_<its overrides>``; the overrides are cut to ``limit``
    characters (file names stop at 255), the number keeps names unique; a '/' in a
    value (a path) becomes '|' so that it does not nest folders."""
    return f"{num}_{overrides.replace('/', '|')[:limit]}" if overrides else str(num)


OmegaConf.register_new_resolver("llmzoo.asset", _asset, replace=True)
OmegaConf.register_new_resolver("llmzoo.job_dirname", _job_dirname, replace=True)


def compose(config_name: str = "train", overrides: Iterable[str] = (), *, validate: bool = True) -> DictConfig:
    """Compose a config like the command line would: ``compose(overrides=["block=dense"])``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(CONF_PACKAGE, version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Run every plugin's ``llmzoo_validate`` and the core checks; raise ConfigError."""
    problems = core_problems(cfg)
    for found in get_plugin_manager().hook.llmzoo_validate(cfg=cfg):
        problems.extend(found or [])
    if problems:
        raise ConfigError(problems)


def _class_attr(node: Any, attr: str) -> frozenset[str] | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None
    module, _, name = target.rpartition(".")
    try:
        value = getattr(importlib.import_module(module), name).__dict__.get(attr)
    except (ImportError, AttributeError):
        return None
    return frozenset(value) if isinstance(value, (set, frozenset)) else None


def block_capabilities(cfg: DictConfig) -> dict[str, frozenset[str]] | None:
    """{part name: capabilities} of the configured block, known without building it.

    A block class states them as a ``capabilities`` class attribute, or -- when they
    depend on its config (hybrid stacks, a block wrapping a configurable mixer) --
    through a static ``part_capabilities(node)``. None when the class says nothing.
    """
    node = cfg.get("block")
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    parts = getattr(cls, "part_capabilities", None)
    if parts is not None:
        return parts(node)
    caps = _class_attr(node, "capabilities")
    return None if caps is None else {f"{target}": caps}


def core_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    for key in ("model", "block", "objective", "tokenizer", "decoder", "parallel", "data", "trainer"):
        if key not in cfg or cfg[key] is None:
            problems.append(f"`{key}` is missing: choose an option, e.g. `{key}=<name>` (see `llmzoo plugins`)")
    if problems:
        return problems
    for key in ("block", "objective", "tokenizer", "decoder", "parallel"):
        target = cfg[key].get("_target_")
        if target:
            module, _, name = target.rpartition(".")
            try:
                getattr(importlib.import_module(module), name)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{key}._target_={target!r} cannot be imported: {type(e).__name__}: {e}")
    m = cfg.model
    for key in ("dim", "n_layers", "max_seq_len"):
        if not isinstance(m.get(key), int) or m.get(key) <= 0:
            problems.append(f"model.{key} must be a positive integer, got {m.get(key)!r}")
    seq_len = cfg.data.get("seq_len")
    if isinstance(seq_len, int) and isinstance(m.get("max_seq_len"), int) and seq_len > m.max_seq_len:
        problems.append(f"data.seq_len={seq_len} is longer than model.max_seq_len={m.max_seq_len}")
    for group in ("decoder", "parallel"):  # what the decoder / the strategy needs from the blocks
        needs = _class_attr(cfg[group], "requires")
        for part, caps in (block_capabilities(cfg) or {}).items() if needs else ():
            if not needs <= caps:
                problems.append(
                    f"{group}={_choice(cfg, group)} requires block capabilities {sorted(needs)}, "
                    f"but block={_choice(cfg, 'block')}: {part} lacks {sorted(needs - caps)} (it has {sorted(caps)})"
                )
    return problems


def _choice(cfg: DictConfig, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except Exception:  # noqa: BLE001 - no Hydra context (plain compose)
        return str(OmegaConf.select(cfg, f"{group}._target_"))


@dataclass(frozen=True)
class Option:
    group: str
    name: str
    distribution: str
    source: str


def _list_yaml(path: str) -> list[tuple[str, str]]:
    """(group, option) for every ``group/option.yaml`` under a search-path entry."""
    if path.startswith("pkg://"):
        root: Any = resources.files(path[len("pkg://"):].replace("/", "."))
    else:
        root = Path(path[len("file://"):] if path.startswith("file://") else path)
    out = []
    for group_dir in root.iterdir():
        if not group_dir.is_dir() or group_dir.name.startswith(("_", ".")):
            continue
        for f in group_dir.iterdir():
            if f.name.endswith(".yaml"):
                out.append((group_dir.name, f.name[: -len(".yaml")]))
    return out


def list_options() -> list[Option]:
    """Every option of every config group with the package that provides it."""
    seen: dict[tuple[str, str], Option] = {}
    for info, path in get_plugin_manager().conf_paths():
        for group, name in _list_yaml(path):
            seen.setdefault((group, name), Option(group, name, info.distribution, path))
    return sorted(seen.values(), key=lambda o: (o.group, o.name))
