"""Stopping on a signal: Ctrl-C (SIGINT) and SIGTERM end a command the same way, with their exit codes.

SIGTERM raises `Terminated`, a KeyboardInterrupt, so every cleanup written for Ctrl-C (temporary files,
claims, the batch summary) runs for it too. The command group turns either into a one-line message and
exit code 130 (Ctrl-C) or 143 (SIGTERM) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def exit_code(stop: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
    raise Terminated


def handle_sigterm() -> None:
    """From now on SIGTERM raises Terminated in the main thread (elsewhere, nothing changes)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _raise_terminated)
