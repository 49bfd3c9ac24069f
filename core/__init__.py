"""llmzoo: build, train, align, decode and compare LLM architectures by combining plugins.

Python API::

    import llmzoo
    cfg = llmzoo.compose(overrides=["model=tiny", "block=dense"])
    model = llmzoo.build_model(cfg)
    run = llmzoo.load_run("runs/quickstart")   # run.model, run.tokenizer, run.cfg, run.objective
"""

from .hookspecs import hookimpl  # noqa: I001 - plugins import the marker first
from .api import (Run, build_decoder, build_model, build_objective, build_strategy, build_tokenizer, generate,
                  load_checkpoint, load_run)
from .config import ConfigError, compose, list_options, validate_config
from .data import ChatTemplate
from .interfaces import Batch, Block, Decoder, Loss, ModelOutput, Objective, ParallelStrategy, Tokenizer
from .layers import ResidualBlock, RMSNorm, SwiGLU
from .model import LanguageModel

__version__ = "0.1.0"
#: The plugin contract's version (interfaces, hookspecs, capability names); CHANGELOG.md
#: records every change. A plugin module states the one it was written for with
#: ``LLMZOO_CONTRACT = "3"``; ``llmzoo plugins`` shows it.
__contract_version__ = "3.1"

__all__ = [
    "Batch", "Block", "ChatTemplate", "ConfigError", "Decoder", "LanguageModel", "Loss", "ModelOutput", "Objective",
    "ParallelStrategy", "RMSNorm", "ResidualBlock", "Run", "SwiGLU", "Tokenizer", "build_decoder", "build_model",
    "build_objective", "build_strategy", "build_tokenizer", "compose", "generate", "hookimpl", "list_options", "load_checkpoint",
    "load_run", "train", "validate_config",
]


def train(cfg):
    """Train as configured (see ``llmzoo.training.train``); returns a summary dict."""
    from .training import train as _train

    return _train(cfg)
