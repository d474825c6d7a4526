"""Ctrl-C and SIGTERM during a batch edit: finish what is being written, then stop (`Interrupts`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

from icdcli.core.stopping import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated


class Interrupts:
    """First Ctrl-C: finish the current item, then stop. Second: stop at once (KeyboardInterrupt).

    SIGTERM: drop the current item if it has not started writing (Terminated), else finish it; then stop
    with exit code 143. `droppable` says whether the current item may still be dropped. `notify` hears what
    happens next. Outside the main thread the signals are left as they are.
    """

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.notify = notify
        self.requested = False
        self.code = EXIT_INTERRUPTED
        self.droppable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        for signum, handler in ((signal.SIGINT, self._handle), (signal.SIGTERM, self._terminate)):
            with contextlib.suppress(ValueError):  # not the main thread: leave the signals as they are
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.notify("stopping after the current image (Ctrl-C again to stop at once)")

    def _terminate(self, signum: int, frame: Any) -> None:
        first = self.code != EXIT_TERMINATED
        self.requested, self.code = True, EXIT_TERMINATED
        if self.droppable:
            self.droppable = False
            raise Terminated
        if first:
            self.notify("terminating after the current image")

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
