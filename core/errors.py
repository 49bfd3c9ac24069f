"""The errors a user can cause, and how every command-line entry point reports them.

A ``UserError`` (bad config, bad data, an unsafe or broken file) is printed as one
message -- what is wrong, where, what is allowed -- and the program exits with its
``exit_code`` (2), never with a traceback. ``LLMZOO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator


class UserError(Exception):
    """Something the user can fix; the message says what and where."""

    exit_code = 2


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file (and line)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint, run folder or weights file that cannot (or must not) be loaded or written."""


class RunFolderError(UserError):
    """A run folder that is in use by another run, or would be overwritten."""


class NonFiniteError(UserError):
    """Training produced a NaN/inf loss or gradient; the weights were not updated with it."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGTERM/SIGINT stopped training after a resumable checkpoint was written. A
    BaseException, like KeyboardInterrupt: code that catches ``Exception`` lets it through."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def debug() -> bool:
    return os.environ.get("LLMZOO_DEBUG", "") not in ("", "0", "false")


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a UserError or an Interrupted into one line on stderr and its exit code."""
    try:
        yield
    except (UserError, Interrupted) as e:
        if debug():
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
