"""Prompts as people type them, for the commands that take one (``llmzoo-generate``): free
text after ``--`` or in ``prompt=`` with no Hydra quoting, a file, or text piped in."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import UserError


def typed_prompt(args: list[str]) -> tuple[list[str], str | None]:
    """(the arguments Hydra parses, the prompt as typed): the words after ``--``, or the
    value of a ``prompt=...`` argument taken verbatim -- so ``12 + 7 =`` needs no Hydra
    quoting (one layer of quotes around it, Hydra's style, is removed)."""
    if "--" in args:
        i = args.index("--")
        return args[:i], " ".join(args[i + 1:])
    kept, prompt = [], None
    for a in args:
        if a.startswith("prompt="):
            prompt = a[len("prompt="):]
            if len(prompt) >= 2 and prompt[0] == prompt[-1] and prompt[0] in "'\"":
                prompt = prompt[1:-1]
        else:
            kept.append(a)
    return kept, prompt


def prompts_from(cfg: Any, typed: str | None = None) -> list[str]:
    """The prompts, the first of: ``typed`` (see ``typed_prompt``), ``prompt_file=``,
    ``prompts=[...]``, standard input when text is piped in, ``prompt`` (the default)."""
    if typed is not None:
        return [typed]
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt_file={cfg.prompt_file}: no such file")
        return [path.read_text(encoding="utf-8").rstrip("\n")]
    if cfg.prompts:
        return list(cfg.prompts)
    piped = _piped_stdin()
    return [piped] if piped else [cfg.prompt]


def _piped_stdin() -> str | None:
    """Text piped to standard input (``echo "12 + 7 =" | llmzoo-generate ...``); None for a
    terminal or an input with nothing ready (never waits)."""
    import select

    try:
        if sys.stdin is None or sys.stdin.isatty() or not select.select([sys.stdin], [], [], 0)[0]:
            return None
        return sys.stdin.read().rstrip("\n") or None
    except (OSError, ValueError):  # no usable stdin (closed, not selectable)
        return None
