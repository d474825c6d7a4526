"""`icd edit --jobs -`: one process with the model loaded, one edit per JSON line read, one JSON line per result."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.core.errors import ICDUsageError
from icdcli.core.texts import LINE_BYTES
from icdcli.run.signals import Interrupts

if TYPE_CHECKING:
    from icdcli.run.runner import EditRun


def run_jobs(run: EditRun, stream: Any, *, output: str | None, any_output: bool) -> None:
    """One edit per JSON line of `stream` (the fields of a .jsonl spec row), one JSON result line each, until end
    of input; then the summary line, and the exit code of a stop.

    The model loads once, before the first line is read. A line that cannot be used gives a failed line.
    """
    from icdcli.core.stopping import exit_code

    folder = None
    if output is not None:
        folder = Path(output)
        if not folder.is_dir():
            raise ICDUsageError(f"-o {output}: with --jobs, -o is a folder that exists (outputs go inside)")
    run.report.stream = True
    with Interrupts(run.report.reporter.say) as interrupts:
        run.steps.interrupts = interrupts
        try:
            interrupts.droppable = True  # SIGTERM while loading: nothing started, so stop at once
            run.session()
            interrupts.droppable = False
            for number, line in enumerate(_bounded_lines(stream), start=1):
                if line is None:
                    item = _job_error(number, f"the line is longer than {LINE_BYTES:,} characters (icd's text "
                                              "limits); shorten its prompts")  # fmt: skip
                elif not line.strip():
                    continue
                else:
                    item = _job_item(run, line, number, folder, any_output=any_output)
                run.pipeline(interrupts).run([item])
                if interrupts.requested:
                    break
        except KeyboardInterrupt as stop:
            sys.exit(exit_code(stop))
    seconds = time.perf_counter() - run.started
    run.report.reporter.say(run.report.tally.line(seconds, interrupts.requested))
    if interrupts.requested:
        sys.exit(interrupts.code)


def _job_item(run: EditRun, line: str, number: int, folder: Path | None, *, any_output: bool) -> Any:
    """The planned edit of one line of `--jobs -` (an item with its error when the line is not a usable job)."""
    from icdcli.run.batch import spec_row
    from icdcli.run.inputs import edits_of
    from icdcli.run.planning import plan_items

    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        return _job_error(number, f"not a JSON object ({error})")
    (item,) = edits_of([spec_row(raw, number, Path("-"))], run.flags)  # JSON null too: "a row must be an object"
    return plan_items([item], folder, spec_out=Path("."), anywhere=any_output, suffix=run.flags.suffix)[0]


def _bounded_lines(stream: Any) -> Iterator[str | None]:
    """The lines of `stream`; None for one longer than LINE_BYTES, which is read to its end but never held whole."""
    while True:
        line = stream.readline(LINE_BYTES + 1)
        if not line:
            return
        if len(line) > LINE_BYTES and not line.endswith("\n"):
            while True:
                rest = stream.readline(LINE_BYTES)
                if not rest or rest.endswith("\n"):
                    break
            yield None
            continue
        yield line


def _job_error(number: int, message: str) -> Any:
    from icdcli.run.batch import Item

    label = f"-:{number}"
    return Item(label, label, row=number, error=f"{label}: {message}")
