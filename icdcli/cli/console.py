"""What a command prints, and where: the one place that decides quiet, verbose, JSON and terminal output.

- stdout holds a command's result: its `--json` records (`Console.json`), or the report it was asked for (`icd info`,
  `icd cache list`, a benchmark's tables: `Console.report`). -q and -v leave it as it is.
- stderr holds the messages for a human: progress and notes (`say`), debug detail (`Console.detail`, only with -v)
  and errors (`Console.error`, always). -q keeps only the errors.

Lower layers never import this module: they report through a `progress` callable the command hands them (`say`), or
through the `icd` logger, whose one handler writes here under the same switches (INFO lines as they are, WARNING and
above with their level, DEBUG only with -v). Progress bars follow -q as well (`bars_disabled`).

Every command takes `-q/--quiet` and `-v/--verbose` (`console_options`), the `icd` group too, so `icd -q edit ...`
and `icd edit ... -q` mean the same. One console belongs to one invocation (it lives in the click context's meta),
and is the active one for the process while that invocation runs, so threads of a command write through it too.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from typing import Any

import click

LOGGER = "icd"
_META_KEY = "icd.console"


class Verbosity(enum.IntEnum):
    QUIET = 0
    NORMAL = 1
    VERBOSE = 2


_LOG_LEVELS = {Verbosity.QUIET: logging.ERROR, Verbosity.NORMAL: logging.INFO, Verbosity.VERBOSE: logging.DEBUG}


class Console:
    """The output switches of one invocation, and the writes that obey them."""

    def __init__(self, verbosity: Verbosity = Verbosity.NORMAL) -> None:
        self.verbosity = verbosity
        self.noted: set[str] = set()  # the notes (INFO lines) said so far: each is said once

    @property
    def quiet(self) -> bool:
        return self.verbosity is Verbosity.QUIET

    @property
    def verbose(self) -> bool:
        return self.verbosity is Verbosity.VERBOSE

    @property
    def bars_disabled(self) -> bool | None:
        """tqdm's `disable`: True under -q, else None (a bar only on a terminal)."""
        return True if self.quiet else None

    def say(self, message: str) -> None:
        """A message for a human on stderr (progress, a note, what was written); none under -q."""
        if not self.quiet:
            click.echo(message, err=True)

    def detail(self, message: str) -> None:
        """Debug detail on stderr, only with -v."""
        if self.verbose:
            click.echo(message, err=True)

    def error(self, message: str) -> None:
        """A line that explains a failure or a stop, on stderr whatever the switches."""
        click.echo(message, err=True)

    def json(self, value: Any, **options: Any) -> None:
        """One machine-readable record on stdout, as JSON any parser reads (`strict_json`: no NaN)."""
        from icdcli.core.values import strict_json

        click.echo(strict_json(value, **options))

    def report(self, text: str) -> None:
        """The human-readable result a command was asked for, on stdout."""
        click.echo(text)

    def apply(self) -> None:
        """Make this console the process's: the `icd` logger writes through it at its level."""
        global _active
        _active = self
        logger = logging.getLogger(LOGGER)
        if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
            logger.addHandler(_ConsoleHandler())
        logger.setLevel(_LOG_LEVELS[self.verbosity])
        # read by the libraries when (lazily) imported: their warnings and bars stay off stderr (see `tune_libraries`)
        for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(variable, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def tune_libraries(self) -> None:
        """diffusers and transformers (imported here): errors only and no bars, with -v their INFO log too."""
        from icdcli.core.quiet import quiet_libraries

        quiet_libraries()
        if self.verbose:
            import diffusers.utils.logging
            import transformers.utils.logging

            diffusers.utils.logging.set_verbosity_info()
            transformers.utils.logging.set_verbosity_info()


_active = Console()


class _ConsoleHandler(logging.Handler):
    """The `icd` logger's one handler: a record as a line through the active console (INFO without its level)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and _active.verbose:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.levelno == logging.INFO:  # a note, once per command: a folder's edits share their prompts
                if message in _active.noted:
                    return
                _active.noted.add(message)
            line = message if record.levelno == logging.INFO else f"{record.levelname}: {message}"
            (_active.error if record.levelno >= logging.ERROR else _active.say)(line)
        except Exception:  # a log line must never end the command
            self.handleError(record)


def console() -> Console:
    """The console of the invocation running now (within a command), else the one last made active."""
    ctx = click.get_current_context(silent=True)
    return _for_context(ctx) if ctx is not None else _active


def say(message: str) -> None:
    """`Console.say` on the active console: the `progress` callable commands hand the layers below."""
    _active.say(message)


def _for_context(ctx: click.Context) -> Console:
    """The invocation's console, made (and made active) by its first option; the one active before comes back when
    the invocation ends, so a process that runs commands one after another (a test run) starts each afresh."""
    found = ctx.meta.get(_META_KEY)
    if found is None:
        found = ctx.meta[_META_KEY] = Console()
        ctx.find_root().call_on_close(_active.apply)
        found.apply()
    return found


def _set_verbosity(wanted: Verbosity) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        chosen = _for_context(ctx)
        if value and chosen.verbosity not in (Verbosity.NORMAL, wanted):
            raise click.UsageError("-q and -v ask for opposite things: give one of them", ctx)
        if value:
            chosen.verbosity = wanted
        chosen.apply()

    return callback


def console_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-q/--quiet and -v/--verbose, for every command and group (they set the invocation's console)."""
    quiet = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_set_verbosity(Verbosity.QUIET),
        help="Print only errors (and, with --json, the JSON): no progress, notes or bars.",
    )
    verbose = click.option(
        "-v",
        "--verbose",
        is_flag=True,
        expose_value=False,
        callback=_set_verbosity(Verbosity.VERBOSE),
        help="Also print debug detail: icd's debug log, the model libraries' log, timings.",
    )
    return quiet(verbose(command))
