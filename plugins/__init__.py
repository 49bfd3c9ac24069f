"""llmzoo's built-in plugins: one file per technique, each registered through the
``llmzoo`` entry-point group exactly like a third-party plugin.

This package module itself is the plugin that contributes the built-in configs.
"""

from llmzoo import hookimpl


@hookimpl
def llmzoo_conf_path() -> str:
    return "pkg://llmzoo_conf"
