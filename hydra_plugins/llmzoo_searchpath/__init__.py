"""Hydra search-path plugin: adds the config folders of llmzoo plugins to llmzoo apps.

Hydra imports every module under the ``hydra_plugins`` namespace package and
calls ``manipulate_search_path`` before composing. Only apps whose primary
config is llmzoo's (``pkg://llmzoo_conf``) are touched.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LlmzooSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        paths = [e.path for e in search_path.get_path()]
        if "pkg://llmzoo_conf" not in paths and "llmzoo_conf" not in paths:
            return
        from llmzoo.plugins import get_plugin_manager

        for info, path in get_plugin_manager().conf_paths():
            if path not in paths and path.replace("pkg://", "") not in paths:
                search_path.append(provider=f"llmzoo-plugin:{info.distribution}", path=path)
                paths.append(path)
