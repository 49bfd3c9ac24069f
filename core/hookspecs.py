"""The whole llmzoo plugin contract: a few typed, documented pluggy hooks.

A plugin is a module (or object) with functions marked ``@llmzoo.hookimpl`` whose
names are the hooks below. Built-in plugins (``llmzoo_plugins``) are registered
exactly like third-party ones: through the ``llmzoo`` entry-point group::

    [project.entry-points.llmzoo]
    myplugin = "my_package.plugin"

A function marked ``@hookimpl`` whose name matches no hook here is refused when the
plugins load (``pluggy.PluginManager.check_pending``), naming its package: a misspelt
hook never goes silently unused. A plugin module may implement no hook at all: it is
registered so that ``llmzoo plugins`` lists it, and it states the contract it was
written for with ``LLMZOO_CONTRACT = "3"`` (see ``llmzoo.__contract_version__``).

Rules about one component live on its class (``check(node, cfg)``, reading only its
own node); rules that span config groups live in ``llmzoo_validate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import Callback
    from omegaconf import DictConfig

    from .api import Run
    from .interfaces import HFArchitecture

PROJECT = "llmzoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmzoo_conf_path() -> str | None:
    """Where this plugin's configs live.

    :return: ``pkg://package.conf`` or a folder path, whose sub-folders add options to
        config groups (``block/my_block.yaml`` becomes ``block=my_block``); None if the
        plugin adds no configs.

    Every plugin's answer is collected (not firstresult).
    """


@hookspec
def llmzoo_validate(cfg: "DictConfig") -> list[str]:
    """Problems with a composed config that span config groups.

    :param cfg: the whole composed config (read only).
    :return: sentences naming the key at fault (``"decoder=medusa needs objective=medusa"``);
        [] if none.

    Called once, after composition and before anything is built or trained; every
    plugin's problems are collected and reported together (exit 2).
    """


@hookspec
def llmzoo_callbacks(cfg: "DictConfig") -> list["Callback"]:
    """Extra Lightning callbacks for a training run.

    :param cfg: the run's config.
    :return: callbacks to add to the Trainer ([] for none); every plugin's are added.
    """


@hookspec(firstresult=True)
def llmzoo_load_run(path: str) -> "Run | None":
    """Resolve a path scheme core does not know (``hf:<folder>``) into a run.

    :param path: what the user gave to ``init_from=``, ``llmzoo.api.load_any`` or a
        reference-model option.
    :return: an ``llmzoo.api.Run`` (model, tokenizer, config), or None when the path is
        not this plugin's (core then reads it as a run folder or ``.ckpt`` file).

    firstresult: the first plugin that returns a run wins. A run resolved here brings its
    own ``model``, ``block`` and ``tokenizer`` config when used as ``init_from``.
    """


@hookspec
def llmzoo_commands(subparsers: Any) -> None:
    """Add ``llmzoo <command>`` subcommands (as pytest's ``pytest_addoption``).

    :param subparsers: the ``argparse`` subparsers action of ``llmzoo``; call
        ``subparsers.add_parser(name, ...)`` and ``set_defaults(run=fn)`` where ``fn(args)``
        runs the command. A ``llmzoo.errors.UserError`` it raises is printed as one line
        with exit code 2.
    """


@hookspec
def llmzoo_hf_architectures() -> list["HFArchitecture"]:
    """Converters between Hugging Face ``transformers`` folders and llmzoo models.

    :return: one ``llmzoo.interfaces.HFArchitecture`` per model family ([] for none).
        ``llmzoo import-hf`` picks the one whose ``model_types`` holds config.json's
        ``model_type``, ``llmzoo export-hf`` the first whose ``exports(cfg)`` says yes.
    """


@hookspec
def llmzoo_data_formats() -> dict:
    """More ``data.format`` options for the built-in data module.

    :return: ``{name: (file extensions, reader)}``. ``reader(path, skip_bad, bad,
        **data.format_options)`` yields one dict per record with the document in
        ``"text"``; it raises ``llmzoo.errors.DataError`` naming ``file:line`` for a broken
        record, or, with ``skip_bad``, appends that message to the ``bad`` list and goes
        on. Files are found by extension with ``data.format=auto``.
    """
