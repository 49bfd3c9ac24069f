"""Finding, registering and listing plugins (pluggy + the ``llmzoo`` entry-point group)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmzoo"
DISABLE_ENV = "LLMZOO_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_MODULE = "llmzoo_plugins"


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    module: str
    distribution: str  # the pip package that provides it
    contract: str | None = None  # the module's LLMZOO_CONTRACT: the contract version it was written for


@dataclass(frozen=True)
class PluginError:
    name: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} from package {self.distribution!r} failed to load: {self.error}"


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.errors: list[PluginError] = []

    def register_plugin(self, plugin: object, info: PluginInfo) -> None:
        if self.is_registered(plugin):
            return
        self.register(plugin, name=info.name)
        self.infos[info.name] = info

    def load_entry_points(self) -> None:
        """Import every ``llmzoo`` entry point. The built-in one always loads;
        third-party ones unless LLMZOO_DISABLE_PLUGIN_AUTOLOAD is set. A plugin that
        fails to import is recorded (and logged) with its distribution name; the
        others still load."""
        autoload = not os.environ.get(DISABLE_ENV)
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            builtin = ep.value.split(":")[0].split(".")[0] == BUILTIN_MODULE
            if not (autoload or builtin):
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
                err = PluginError(ep.name, dist, f"{type(e).__name__}: {e}")
                self.errors.append(err)
                log.error("%s", err)
                continue
            contract = getattr(plugin, "LLMZOO_CONTRACT", None)
            self.register_plugin(plugin, PluginInfo(ep.name, ep.value, dist, None if contract is None else str(contract)))
        self.refuse_unknown_hooks()
        if not any(i.module.startswith(BUILTIN_MODULE) for i in self.infos.values()):
            raise RuntimeError(
                "llmzoo's built-in plugins are not registered: install the package "
                "(`pip install -e .`) so that its `llmzoo` entry points exist"
            )

    def refuse_unknown_hooks(self) -> None:
        """pluggy's ``check_pending``, per plugin: a plugin with a ``@hookimpl`` whose name
        matches no hookspec (a misspelt hook) is unregistered and recorded as an error
        naming its package and the valid hook names; the other plugins stay."""
        try:
            self.check_pending()
        except pluggy.PluginValidationError:
            pass
        else:
            return
        known = sorted(n for n in dir(hookspecs) if n.startswith("llmzoo_"))
        for hook_name in list(vars(self.hook)):
            caller = getattr(self.hook, hook_name)
            if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                name = self.get_name(impl.plugin)
                info = self.infos.pop(name, None) if name else None
                if name and self.is_registered(impl.plugin):
                    self.unregister(impl.plugin)
                err = PluginError(name or "?", info.distribution if info else "?",
                                  f"@hookimpl {hook_name!r} matches no llmzoo hook (valid: {', '.join(known)})")
                self.errors.append(err)
                log.error("%s", err)

    def conf_paths(self) -> list[tuple[PluginInfo, str]]:
        """(plugin, search-path entry) for every plugin that contributes configs
        (its ``llmzoo_conf_path`` hook implementation)."""
        out = []
        for impl in self.hook.llmzoo_conf_path.get_hookimpls():  # in registration order
            info = self.infos.get(self.get_name(impl.plugin) or "")
            path = cast("str | None", impl.function())
            if path and info:
                if not path.startswith(("pkg://", "file://")):
                    path = "file://" + str(Path(path).resolve())
                out.append((info, path))
        return out


@lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    pm = PluginManager()
    pm.load_entry_points()
    return pm


def reset_plugin_manager() -> None:
    """Forget loaded plugins (tests that install or remove plugin packages)."""
    get_plugin_manager.cache_clear()
    importlib.invalidate_caches()
