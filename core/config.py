"""Composing, validating and listing Hydra configs.

Configs live in ``conf/`` (shipped as the ``llmzoo_conf`` package) and in the
folders plugins return from ``llmzoo_conf_path``; the Hydra search-path plugin
in ``hydra_plugins/llmzoo_searchpath`` joins the latter to every llmzoo app.
"""

from __future__ import annotations

import importlib
import importlib.resources as resources
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import UserError
from .interfaces import PACKED, BlockExtras, ObjectiveExtras, implied
from .plugins import get_plugin_manager

CONF_PACKAGE = "llmzoo_conf"
PRIMARY_CONF = f"pkg://{CONF_PACKAGE}"
GROUPS = ("tokenizer", "model", "block", "objective", "decoder", "parallel", "data", "trainer",
          "experiment", "hparams_search")


class ConfigError(UserError, ValueError):
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
    """Run the core checks, every ``_target_`` class's own ``check`` and every plugin's
    ``llmzoo_validate``; raise one ConfigError listing every problem."""
    # In stages: a later stage may assume what an earlier one checked (types, imports).
    for stage in (core_problems, value_problems, node_problems, _plugin_problems):
        problems = stage(cfg)
        if problems:
            raise ConfigError(problems)


def _plugin_problems(cfg: DictConfig) -> list[str]:
    return [p for found in get_plugin_manager().hook.llmzoo_validate(cfg=cfg) for p in (found or [])]


def target_class(target: Any) -> Any:
    """The object a ``_target_`` names (a dotted path, or a config node holding one);
    the one place llmzoo resolves them. Raises ImportError/AttributeError when it is not there."""
    if isinstance(target, DictConfig):
        target = target.get("_target_")
    module, _, name = str(target).rpartition(".")
    return getattr(importlib.import_module(module), name)


def node_class(node: Any) -> Any:
    """The class a config node's ``_target_`` names, or None (no target, or not importable:
    reported by the core checks)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        return target_class(target) if target else None
    except Exception:  # noqa: BLE001
        return None


def class_attr(node: Any, attr: str) -> frozenset[str] | None:
    """A class-level set (``requires``, ``needs``, ``provides``) of a node's ``_target_``,
    inherited ones included; a static ``<attr>_for(node)`` answers when it depends on the node."""
    cls = node_class(node)
    if cls is None:
        return None
    value = getattr(cls, f"{attr}_for")(node) if callable(getattr(cls, f"{attr}_for", None)) else getattr(cls, attr, None)
    return frozenset(value) if isinstance(value, (set, frozenset)) else None


def block_capabilities(cfg: DictConfig) -> dict[str, frozenset[str]] | None:
    """{part name: capabilities} of the configured block, known without building it.

    A block class states them as a ``capabilities`` class attribute, or -- when they
    depend on its config (hybrid stacks, a block wrapping a configurable mixer) --
    through a static ``part_capabilities(node)``. None when the class says nothing.
    """
    node = cfg.get("block")
    cls = node_class(node)
    if cls is None:
        return None
    parts = BlockExtras.of(cls).part_capabilities
    if parts is not None:
        return {part: implied(caps) for part, caps in parts(node).items()}
    caps = class_attr(node, "capabilities")
    return None if caps is None else {f"{node._target_}": implied(caps)}


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
            try:
                target_class(target)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{key}._target_={target!r} cannot be imported: {type(e).__name__}: {e}")
    m = cfg.model
    for key in ("dim", "n_layers", "max_seq_len"):
        if not isinstance(m.get(key), int) or m.get(key) <= 0:
            problems.append(f"model.{key} must be a positive integer, got {m.get(key)!r}")
    seq_len = cfg.data.get("seq_len")
    if isinstance(seq_len, int) and isinstance(m.get("max_seq_len"), int) and seq_len > m.max_seq_len:
        problems.append(f"data.seq_len={seq_len} is longer than model.max_seq_len={m.max_seq_len}")
    needs, provides = class_attr(cfg.objective, "needs"), class_attr(cfg.data, "provides")
    if needs is not None and provides is not None and not needs <= provides:
        wanted, provided = needs, provides
        fits = [f"data={d.name}" for d in conf_docs() if d.group == "data"
                and wanted <= (class_attr(OmegaConf.create(d.doc), "provides") or set())]
        problems.append(f"objective={_choice(cfg, 'objective')} needs batch fields {sorted(wanted - provided)}, which "
                        f"data={_choice(cfg, 'data')} does not provide (it provides {sorted(provided)}); "
                        + (f"use {' or '.join(fits)}" if fits else "choose a data module that provides them"))
    if cfg.data.get("packing") == "document" and packing_problems(cfg):
        problems.append("data.packing=document keeps packed documents apart, which this run cannot: "
                        f"{'; '.join(packing_problems(cfg))}; use data.packing=concat, none or auto")
    owners = [g for g in ("objective", "parallel") if _owns_step(cfg[g])]
    if len(owners) > 1:
        problems.append(f"objective={_choice(cfg, 'objective')} and parallel={_choice(cfg, 'parallel')} both own the "
                        "training step (a train_step of their own): only one may; choose another parallel strategy "
                        "or objective")
    for group in ("decoder", "parallel"):  # what the decoder / the strategy needs from the blocks
        required = class_attr(cfg[group], "requires") or frozenset()
        for part, caps in (block_capabilities(cfg) or {}).items() if required else ():
            if not required <= caps:
                problems.append(
                    f"{group}={_choice(cfg, group)} requires block capabilities {sorted(required)}, "
                    f"but block={_choice(cfg, 'block')}: {part} lacks {sorted(required - caps)} (it has {sorted(caps)})"
                )
    return problems


def packing_problems(cfg: DictConfig) -> list[str]:
    """Why the configured stack cannot train on packed rows with document boundaries (empty: it can)."""
    why = [f"block={_choice(cfg, 'block')}: {part} lacks the 'packed' capability"
           for part, caps in (block_capabilities(cfg) or {"the block": frozenset()}).items() if PACKED not in caps]
    if ObjectiveExtras.of(node_class(cfg.objective)).inputs is not None:
        why.append(f"objective={_choice(cfg, 'objective')} builds its own model inputs")
    if _owns_step(cfg.parallel):
        why.append(f"parallel={_choice(cfg, 'parallel')} runs the model its own way (it owns the step)")
    return why


def packing_of(cfg: DictConfig) -> Any:
    """``data.packing`` as it runs: ``auto`` is ``document`` where the stack can keep packed
    documents apart (``packing_problems`` finds nothing), else the data module's unpacked way."""
    packing = cfg.data.get("packing")
    return "document" if packing == "auto" and not packing_problems(cfg) else packing


def _owns_step(node: Any) -> bool:
    """Whether a node's class runs whole optimizer steps itself (``train_step``)."""
    cls = node_class(node)
    return cls is not None and callable(getattr(cls, "train_step", None)) and getattr(cls, "manual_optimization", True)


def _choice(cfg: DictConfig, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except Exception:  # noqa: BLE001 - no Hydra context (plain compose)
        return str(OmegaConf.select(cfg, f"{group}._target_"))


# ----------------------------------------------------------------------------- values and keys
@dataclass(frozen=True)
class Rule:
    """What a numeric or boolean setting may hold: ``kind`` in (int, float, bool), an
    inclusive ``low`` (exclusive with ``above``), an inclusive ``high``, None allowed or not."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False
    nullable: bool = False

    def describe(self) -> str:
        kind = {int: "an integer", float: "a number", bool: "true or false"}[self.kind]
        bounds = [f"{'>' if self.above else '>='} {self.low}" if self.low is not None else "",
                  f"<= {self.high}" if self.high is not None else ""]
        text = " ".join([kind, " and ".join(b for b in bounds if b)]).strip()
        return text + (" or null" if self.nullable else "")

    def problem(self, key: str, v: Any) -> str | None:
        import math

        if v is None:
            return None if self.nullable else f"{key} must be set: {self.describe()}"
        if self.kind is bool:
            ok = isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (self.kind is float or isinstance(v, int))
            ok = ok and math.isfinite(v) and (self.low is None or (v > self.low if self.above else v >= self.low)) \
                and (self.high is None or v <= self.high)
        return None if ok else f"{key}={v!r} is not allowed: {self.describe()}"


_POS, _NONNEG = Rule(int, 1), Rule(int, 0)
# Settings of the groups that have no class of their own to check them (model, trainer,
# optim, sample) and the data fields every data module shares.
RULES: dict[str, Rule] = {
    "seed": _NONNEG,
    **{f"model.{k}": _POS for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")},
    "model.ffn_hidden": Rule(int, 1, nullable=True), "model.vocab_size": Rule(int, 1, nullable=True),
    "model.pad_vocab_to": Rule(int, 1, nullable=True), "model.tie_embeddings": Rule(bool),
    "model.norm_eps": Rule(float, 0, 1, above=True), "model.init_std": Rule(float, 0, above=True),
    "model.rope_theta": Rule(float, 0, above=True),
    **{f"trainer.{k}": _POS for k in ("max_steps", "num_nodes", "accumulate_grad_batches", "log_every_n_steps",
                                      "checkpoint_every")},
    "trainer.val_every": _NONNEG, "trainer.gradient_clip_val": Rule(float, 0, nullable=True),
    "trainer.progress_refresh_rate": _POS,
    **{f"trainer.{k}": Rule(bool) for k in ("enable_progress_bar", "enable_model_summary", "deterministic",
                                            "compile")},
    "optim.lr": Rule(float, 0, above=True), "optim.weight_decay": Rule(float, 0), "optim.eps": Rule(float, 0, above=True),
    "optim.warmup_steps": _NONNEG, "optim.min_lr_ratio": Rule(float, 0, 1),
    "data.batch_size": _POS, "data.seq_len": _POS, "data.val_fraction": Rule(float, 0, 0.99),
    "data.max_val_sequences": _NONNEG, "data.num_workers": _NONNEG, "data.skip_bad_records": Rule(bool),
    "sample.max_new_tokens": _NONNEG,
}


# Settings whose value is one of a list (Lightning's own names for the trainer's).
CHOICES: dict[str, tuple[Any, ...]] = {
    "trainer.precision": ("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true", "bf16-true",
                          "64-true", "64", 64, "transformer-engine", "transformer-engine-float16"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"),
    "data.sample_by": ("line", "paragraph", "document"),
}


def settings_problems(cfg: DictConfig, rules: dict[str, Rule], choices: dict[str, tuple[Any, ...]]) -> list[str]:
    """Each present key against its rule or its list of allowed values."""
    problems = [p for key, rule in rules.items() if (got := _get(cfg, key))[0] and (p := rule.problem(key, got[1]))]
    for key, allowed in choices.items():
        present, v = _get(cfg, key)
        if present and (isinstance(v, bool) or v not in allowed):
            problems.append(f"{key}={v!r} is not allowed: one of {list(dict.fromkeys(str(a) for a in allowed))}")
    return problems


def check_settings(cfg: DictConfig, rules: dict[str, Rule], choices: dict[str, tuple[Any, ...]] | None = None) -> None:
    """``settings_problems`` as one ConfigError (for the generate, serve and eval apps)."""
    if problems := settings_problems(cfg, rules, choices or {}):
        raise ConfigError(problems)


def check_device(device: Any, key: str = "device") -> str:
    """The torch device to run on: ``device`` (cpu, cuda, cuda:N, mps), or cuda when there
    is one and cpu otherwise for null; one that this machine lacks is a ConfigError."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise ConfigError([f"{key}={device!r} is not allowed: cpu, cuda, cuda:N, mps or null (the best there is)"])
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        raise ConfigError([f"{key}={device!r}: this machine has {torch.cuda.device_count()} CUDA devices"])
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError([f"{key}={device!r}: MPS is not available on this machine"])
    return str(device)


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; an interpolation that fails is a ConfigError."""
    node: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig) or parts[-1] not in node:
        return False, None
    try:
        return True, node[parts[-1]]
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        raise ConfigError([f"{key}: {e}"]) from None


def value_problems(cfg: DictConfig) -> list[str]:
    problems = settings_problems(cfg, RULES, CHOICES)
    present, betas = _get(cfg, "optim.betas")
    if present and not (OmegaConf.is_list(betas) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        problems.append(f"optim.betas={betas!r} is not allowed: two numbers in [0, 1)")
    present, limit = _get(cfg, "trainer.limit_val_batches")
    if present and not ((isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0)
                        or (isinstance(limit, float) and 0 <= limit <= 1)):
        problems.append(f"trainer.limit_val_batches={limit!r} is not allowed: a count >= 0 or a fraction in [0, 1]")
    return problems + unknown_key_problems(cfg)


def known_keys() -> dict[str, set[str]]:
    """{node: keys its options define}: "" for the top level (primary configs, global
    experiment files, group names), a group name for the union of its options' keys, a
    primary config's sub-node (``optim``, ``sample``) by name."""
    keys: dict[str, set[str]] = {"": {"reward", "quantize", "bench"}}
    for d in conf_docs():
        own = {k for k in d.doc if k not in ("defaults", "hydra")}
        if d.group in ("", "experiment", "hparams_search"):  # global packages
            keys[""] |= own
        else:
            keys[""].add(d.group)
            keys.setdefault(d.group, set()).update(own)
        if d.group == "":
            for k, v in d.doc.items():
                if isinstance(v, dict) and k != "hydra":
                    keys.setdefault(k, set()).update(v)
    return keys


def _unknown(key: str, found: Iterable[str], allowed: set[str]) -> list[str]:
    import difflib

    out = []
    for k in sorted(set(found) - allowed):
        close = difflib.get_close_matches(k, sorted(allowed), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(sorted(allowed))}"
        out.append(f"{key + '.' if key else ''}{k} is not a known setting ({hint})")
    return out


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """Keys that no option defines (a typo, or ``+trainer.logger=wandb``), for the nodes
    without a class of their own (those are checked against the class's arguments)."""
    known = known_keys()
    problems = _unknown("", [str(k) for k in cfg if not str(k).startswith("_")], known[""])
    for name in ("model", "trainer", "optim", "sample"):
        node = cfg.get(name)
        if isinstance(node, DictConfig) and "_target_" not in node and name in known:
            problems += _unknown(name, [str(k) for k in node.keys()], known[name])
    return problems


def _target_nodes(node: Any, key: str = "") -> Iterable[tuple[str, DictConfig]]:
    """Every node with a ``_target_`` (nested ones included) with its dotted key."""
    if isinstance(node, DictConfig):
        if "_target_" in node and key:
            yield key, node
        for k in node.keys():
            child: Any = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{key}.{k!s}" if key else str(k))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{key}[{i}]")


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "NoneType": type(None)}


def _type_problem(key: str, annotation: Any, v: Any) -> str | None:
    """A value that cannot have its parameter's simple annotation (``int``, ``float | None``, ...)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)  # float | None as an object
    names = [a.strip() for a in str(annotation).replace("Optional[", "").rstrip("]").split("|")] if isinstance(
        annotation, str) else [getattr(a, "__name__", "?") for a in (typing.get_args(annotation) if union else [annotation])]
    if not names or any(n not in _SIMPLE for n in names) or OmegaConf.is_config(v):
        return None
    for n in names:
        t = _SIMPLE[n]
        if (t is type(None) and v is None) or (t is bool and isinstance(v, bool)) or \
                (t in (int, float) and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and (t is float or isinstance(v, int))) or (t is str and isinstance(v, str)):
            return None
    return f"{key}={v!r} is not allowed: expected {' or '.join(names)}"


def node_problems(cfg: DictConfig) -> list[str]:
    """Each ``_target_`` node against its class: keys it does not take, values of the
    wrong simple type, then -- once every node has passed those, so that a check may rely on
    its values' types -- the class's own ``check(node, cfg)`` where it defines one."""
    import inspect

    problems: list[str] = []
    checks: list[tuple[str, Any, Callable[..., Any]]] = []
    for key, node in _target_nodes(cfg):
        if key.split(".")[0] == "hydra":
            continue
        target = node.get("_target_")
        try:
            cls = target_class(target)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key}._target_={target!r} cannot be imported: {type(e).__name__}: {e}")
            continue
        try:
            params = dict(inspect.signature(cls).parameters)
        except (TypeError, ValueError):  # no signature to check against
            params = {"_": inspect.Parameter("_", inspect.Parameter.VAR_KEYWORD)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            problems += _unknown(key, [str(k) for k in node.keys() if not str(k).startswith("_")], set(params))
        for k, p in params.items():
            if k in node and p.annotation is not inspect.Parameter.empty:
                present, v = _get(cfg, f"{key}.{k}") if "[" not in key else (True, node[k])
                if present and (problem := _type_problem(f"{key}.{k}", p.annotation, v)):
                    problems.append(problem)
        check = getattr(cls, "check", None)
        if callable(check):
            checks.append((key, node, check))
    if problems:
        return problems
    return [f"{key}: {p}" for key, node, check in checks for p in check(node, cfg) or []]


@dataclass(frozen=True)
class Option:
    group: str
    name: str
    distribution: str
    source: str


def _conf_root(path: str) -> Any:
    """A search-path entry (``pkg://package.conf``, ``file://dir`` or a folder) as a traversable."""
    if path.startswith("pkg://"):
        return resources.files(path[len("pkg://"):].replace("/", "."))
    return Path(path[len("file://"):] if path.startswith("file://") else path)


@dataclass(frozen=True)
class ConfDoc:
    """One yaml file of a search-path entry: ``group`` is "" for a primary config."""

    info: Any
    path: str
    group: str
    name: str
    doc: dict


_DOCS: tuple[tuple[str, ...], list[ConfDoc]] | None = None


def conf_docs() -> list[ConfDoc]:
    """Every primary config and ``group/option.yaml`` (Hydra's own ``hydra/`` group left
    out) of every installed plugin, parsed; read once per set of search-path entries."""
    import yaml

    global _DOCS
    entries = get_plugin_manager().conf_paths()
    key = tuple(path for _, path in entries)
    if _DOCS is None or _DOCS[0] != key:
        docs = []
        for info, path in entries:
            for f in _conf_root(path).iterdir():
                files = [("", f)] if f.name.endswith(".yaml") else [] if not f.is_dir() or f.name == "hydra" or \
                    f.name.startswith(("_", ".")) else [(f.name, o) for o in f.iterdir() if o.name.endswith(".yaml")]
                for group, y in files:
                    try:
                        doc = yaml.safe_load(y.read_text()) or {}
                    except yaml.YAMLError:
                        doc = {}
                    docs.append(ConfDoc(info, path, group, y.name[: -len(".yaml")], doc if isinstance(doc, dict) else {}))
        _DOCS = (key, docs)
    return _DOCS[1]


def registered_targets() -> frozenset[str]:
    """Every ``_target_`` named by a config-group option of an installed plugin (nested
    nodes included): the classes a config read from a file may instantiate."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.update(v for k, v in node.items() if k == "_target_" and isinstance(v, str))
            node = list(node.values())
        if isinstance(node, list):
            for v in node:
                walk(v)

    for d in conf_docs():
        if d.group:
            walk(d.doc)
    return frozenset(found)


def list_options() -> list[Option]:
    """Every option of every config group with the package that provides it."""
    seen: dict[tuple[str, str], Option] = {}
    for d in conf_docs():
        if d.group:
            seen.setdefault((d.group, d.name), Option(d.group, d.name, d.info.distribution, d.path))
    return sorted(seen.values(), key=lambda o: (o.group, o.name))


def shadowed_options() -> list[tuple[Option, str]]:
    """Options that a second package also defines, with that package: the first on the
    config search path (``list_options``) is the one used, the other is unreachable."""
    first: dict[tuple[str, str], Option] = {}
    out = []
    for d in conf_docs():
        if d.group:
            winner = first.setdefault((d.group, d.name), Option(d.group, d.name, d.info.distribution, d.path))
            if winner.distribution != d.info.distribution:
                out.append((winner, d.info.distribution))
    return out
