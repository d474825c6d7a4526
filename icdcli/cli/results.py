"""What `icd edit`, `icd invert` and `icd generate` print of their results: the `Reporter` the layers below report
through (`reporter`), the line of each result, a JSON record with --json, else a line of text (`emit`); and with
--json, a failure's own JSON line (`status` failed, `error`) before its one-line error."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from icdcli.cli.console import console, say
from icdcli.run.report import Reporter


def reporter(as_json: bool) -> Reporter:
    """What the layers below report through: lines for a human (`say`), and with --json the records on stdout."""
    current = console()
    return Reporter(say=say, json=current.json if as_json else None, bars_disabled=current.bars_disabled)


def emit(as_json: bool, record: dict[str, Any]) -> None:
    """One result: a JSON line with --json, else a line of text on stderr (`Reporter.result`)."""
    reporter(as_json).result(record)


@contextlib.contextmanager
def reported_failure(as_json: bool, input_: str | None, output: Path | str | None) -> Iterator[None]:
    """With --json, a failure also prints its JSON line (status failed, error) before the one-line error, unless
    the error says it was reported already (`reported`)."""
    from icdcli.core.errors import ICDError

    try:
        yield
    except (click.ClickException, ICDError) as error:
        if as_json and not getattr(error, "reported", False):
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            line = {"status": "failed", "input": input_, "output": None if output is None else str(output)}
            console().json({**line, "error": message})
        raise


def reports_json_failures(command: Callable[..., Any]) -> Callable[..., Any]:
    """`reported_failure` around a command whose parameters are `as_json`, `output` and `images` or `spec`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        images, spec = kwargs.get("images") or (), kwargs.get("spec")
        given = str(next(iter(images))) if len(images) == 1 else None if spec is None else str(spec)
        with reported_failure(bool(kwargs.get("as_json")), given, kwargs.get("output")):
            return command(*args, **kwargs)

    return wrapper
