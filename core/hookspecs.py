"""The whole llmzoo plugin contract: a few typed, documented pluggy hooks.

A plugin is a module (or object) with functions marked ``@llmzoo.hookimpl`` whose
names are the hooks below. Built-in plugins (``llmzoo_plugins``) are registered
exactly like third-party ones: through the ``llmzoo`` entry-point group::

    [project.entry-points.llmzoo]
    myplugin = "my_package.plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import Callback
    from omegaconf import DictConfig

    from .interfaces import HFArchitecture

PROJECT = "llmzoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmzoo_conf_path() -> str | None:
    """Where this plugin's configs live: ``pkg://package.conf`` or a folder path.

    Its sub-folders add options to config groups: ``block/my_block.yaml`` becomes
    ``block=my_block``. Return None if the plugin adds no configs.
    """


@hookspec
def llmzoo_validate(cfg: "DictConfig") -> list[str]:
    """Problems with a composed config, as sentences naming the key at fault.

    Called after composition and before anything is built or trained; every
    plugin's problems are collected and reported together. Return [] if none.
    """


@hookspec
def llmzoo_callbacks(cfg: "DictConfig") -> list["Callback"]:
    """Extra Lightning callbacks for a training run configured by ``cfg``."""


@hookspec
def llmzoo_hf_architectures() -> list["HFArchitecture"]:
    """Converters between Hugging Face ``transformers`` folders and llmzoo models, one per
    model family (``llmzoo.interfaces.HFArchitecture``): ``llmzoo import-hf`` picks the
    one whose ``model_types`` holds config.json's ``model_type``, ``llmzoo export-hf``
    the first whose ``exports(cfg)`` says yes. A plugin whose block has a ``transformers``
    counterpart returns its converter here; return [] otherwise."""


@hookspec
def llmzoo_data_formats() -> dict:
    """More ``data.format`` options for the built-in data module: ``{name: (file
    extensions, reader)}``. ``reader(path, skip_bad, bad, **data.format_options)`` yields one
    dict per record with the document in ``"text"``; it raises ``llmzoo.errors.DataError``
    naming ``file:line`` for a broken record, or, with ``skip_bad``, appends that message
    to the ``bad`` list and goes on. Files are found by extension with ``data.format=auto``."""
