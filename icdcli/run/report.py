"""What a batch edit tells its user: a line (or with --json a record) per item, a progress bar, and the summary.

Nothing here prints by itself: every line goes through the hooks of a `Reporter`, which the command line fills with
its console (`say` on stderr, JSON records on stdout) and the Python API with a logger (`log_line`) or its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from icdcli.core.errors import ICDError
from icdcli.run.batch import Tally, display
from icdcli.run.flow import ItemError
from icdcli.run.steps import RunError, item_failure


def log_line(message: str) -> None:
    """A line for the user, as an INFO record of the `icd` logger (shown where the logger is set up to show it)."""
    logging.getLogger("icd").info(message)


@dataclass(frozen=True)
class Reporter:
    """Where a run's lines go: `say`, a line for a human (progress, notes, what was written); `json`, one
    machine-readable record (None: no records, lines of text instead); `bars_disabled`, tqdm's `disable` for the
    progress bar (None: a bar only on a terminal)."""

    say: Callable[[str], None] = log_line
    json: Callable[[dict[str, Any]], None] | None = None
    bars_disabled: bool | None = None

    def result(self, record: dict[str, Any]) -> None:
        """One output's result: its JSON record, else a line saying it was written or skipped (and why)."""
        if self.json is not None:
            self.json(record)
        elif record["status"] == "skipped":
            self.say(f"skipped {display(record['output'])}: {record['reason']} (--overwrite makes it again)")
        else:
            self.say(f"wrote {display(record['output'])}")
            if record.get("reconstruction"):  # icd invert --reconstruct
                self.say(f"wrote {display(record['reconstruction'])}")
            log_stage_times(record)


def log_stage_times(record: dict[str, Any]) -> None:
    """With -v (the `icd` logger at debug): where a written output's time went, the `seconds` its --json record holds,
    in one line (`out.png: load 1.16 s, encode 0.136 s, ..., batch of 4`)."""
    seconds = record.get("seconds")
    logger = logging.getLogger("icd")
    if not seconds or not logger.isEnabledFor(logging.DEBUG):
        return
    parts = [f"{stage} {value:.3g} s" for stage, value in seconds.items() if stage != "batch_size"]
    if seconds.get("batch_size", 1) != 1:
        parts.append(f"batch of {seconds['batch_size']}")
    logger.debug("%s: %s", display(record["output"]), ", ".join(parts))


@dataclass(frozen=True)
class ItemOutcome:
    """What became of one item: its key, 'done', 'skipped' or 'failed', the failure's message, and its record as
    --json prints it (a done item's output, settings and seconds; a skip's reason; a failure's error)."""

    key: str
    status: str
    error: str | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: stopped by Ctrl-C or SIGTERM (with its exit code), or by a fatal failure."""

    interrupted: bool
    stopped: bool
    code: int


class RunFailed(ICDError):
    """A run that ends in failure, its items' lines printed already (with --json: no second line for it)."""

    reported = True


class RunReport:
    """The lines of one run, its progress bar and its tally (see the module docstring)."""

    def __init__(self, reporter: Reporter, *, batch: bool) -> None:
        self.reporter = reporter
        self.batch = batch
        self.tally = Tally()
        self.quiet = False  # no line per written or skipped output (a progress bar, icd bench throughput)
        self.stream = False  # flush stdout after each item (--jobs: its reader waits for each line)
        self.outcomes: list[ItemOutcome] | None = None  # every item's outcome, when a caller asks to keep them
        self.bar: Any = None
        self.last_failure: tuple[Any, str] | None = None  # (image, message) of the last failed item

    @property
    def as_json(self) -> bool:
        return self.reporter.json is not None

    def text(self, message: str) -> None:
        """A line for a human, above the progress bar when one is drawn."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            self.reporter.say(message)

    def json(self, record: dict[str, Any]) -> None:
        if self.reporter.json is not None:
            self.reporter.json(record)

    def open_bar(self, total: int) -> None:
        from tqdm import tqdm

        disable = True if self.reporter.bars_disabled else (not self.batch) or None
        self.bar = tqdm(total=total, desc="editing", unit="image", file=sys.stderr, disable=disable,
                        dynamic_ncols=True)  # fmt: skip

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def item(self, item: Any, outcome: Any) -> bool:
        """Report one item's outcome (a record, a skip reason or an ItemError); False when the run must stop."""
        if isinstance(outcome, ItemError):
            failure = item_failure(item, outcome.error)
            if isinstance(failure, RunError):
                raise failure
            if not self.batch:
                if self.as_json:
                    self.failed(item, str(failure))
                raise RunFailed(str(failure)) from None
            self.failed(item, str(failure))
            self.advance()
            return not failure.fatal
        if isinstance(outcome, str):
            self.tally.skipped += 1
            record = {"status": "skipped", "input": str(item.image), "output": str(item.output), "reason": outcome}
            self._keep(item, "skipped", None, record)
            self.json(record)
            again = " (--overwrite makes it again)" if outcome.startswith("already made") else ""
            if not self.quiet:
                self.text(f"skipped {display(item.output)}: {outcome}{again}")
        else:
            self.tally.done += 1
            self._keep(item, "done", None, outcome)
            self.json(outcome)
            if not self.as_json and not self.quiet:
                self.text(f"wrote {display(item.output)}")
                log_stage_times(outcome)
        self.advance()
        return True

    def failed(self, item: Any, message: str) -> None:
        self.tally.failed += 1
        output = None if item.output is None else str(item.output)
        record = {"status": "failed", "input": None if item.image is None else str(item.image), "item": item.label,
                  "output": output, "error": message}  # fmt: skip
        self._keep(item, "failed", message, record)
        self.json(record)
        repeated = getattr(item, "variant", None) not in (None, 1) and self.last_failure == (item.image, message)
        self.last_failure = (item.image, message)
        if self.batch and not repeated:  # an unreadable photo fails each of its --tgt edits the same way: said once
            self.text(f"Error: {message}")

    def _keep(self, item: Any, status: str, error: str | None, record: dict[str, Any]) -> None:
        if self.outcomes is not None:
            self.outcomes.append(ItemOutcome(item.key, status, error, record))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.stream:
            sys.stdout.flush()

    def summary(self, total: int, seconds: float, load_seconds: float, end: RunEnd) -> None:
        """The run's summary (a batch's, or a stopped run's): its JSON record and its line."""
        from icdcli.core.stopping import EXIT_TERMINATED

        self.tally.not_reached = max(0, total - self.tally.reached())
        if self.batch or end.interrupted:
            self.json(self.tally.summary(seconds, load_seconds))
            line = self.tally.line(seconds, end.interrupted)
            self.reporter.say(line.replace("interrupted:", "terminated:", 1) if end.code == EXIT_TERMINATED else line)
