"""`icd edit FOLDER... --watch`: a hot folder. After the images already there, the model stays loaded and the folders
are looked at every `WATCH_INTERVAL` seconds; each image file that is new or changed, and has not been written to
for `SETTLE_SECONDS` (so a file being copied in is not read half made), is edited as the first ones were. Outputs
icd made (its own, landing in a watched folder) are left out, as in any folder run; a rerun skips what is made.
Ctrl-C or SIGTERM ends it after the current batch, with the summary and exit code of a stopped run (130, 143); a
failure that stops any run (a full disk) ends it with exit code 1.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from icdcli.run.batch import display, list_folder
from icdcli.run.inputs import EditFlags
from icdcli.run.report import RunEnd, RunFailed
from icdcli.run.signals import Interrupts

if TYPE_CHECKING:
    from icdcli.run.runner import EditRun

WATCH_INTERVAL = 2.0
"""Seconds between two looks at the watched folders."""
SETTLE_SECONDS = 1.0
"""How long a file must have gone unwritten before it is read: a copy in progress keeps its time fresh."""

Found = tuple[Path, Path]
"""(the watched folder, an image file found in it)."""


class FolderWatch:
    """The image files of `folders` that are new or changed since they were last handed out, once settled."""

    def __init__(
        self,
        folders: list[Path],
        *,
        recursive: bool,
        settle: float = SETTLE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folders, self.recursive, self.settle, self.clock = folders, recursive, settle, clock
        self.handled: dict[Path, tuple[int, int]] = {}  # each file handed out (by real path): (size, modification time)
        self.looked: dict[Path, tuple[int, int]] = {}  # each file as the last look saw it
        self.looked_at = -math.inf  # when (by `clock`)

    def ready(self) -> list[Found]:
        """The files to edit now: each handed out once per (size, modification time) it has had, once it has not
        been written to for `settle` seconds, or has not changed between two looks that far apart (a time in the
        future: another machine's clock, an archive's times). A file seen through two watched names (a link, a
        folder given twice) is handed out once."""
        now = self.clock()
        found: list[Found] = []
        looked: dict[Path, tuple[int, int]] = {}
        for folder in self.folders:
            for path in list_folder(folder, recursive=self.recursive):
                try:
                    stat = os.stat(path)
                except OSError:  # gone since it was listed
                    continue
                real, stamp = Path(os.path.realpath(path)), (stat.st_size, stat.st_mtime_ns)
                if real in looked:
                    continue
                looked[real] = stamp
                unchanged = self.looked.get(real) == stamp and now - self.looked_at >= self.settle
                settled = now - stat.st_mtime >= self.settle or unchanged
                if self.handled.get(real) == stamp or not settled:
                    continue
                self.handled[real] = stamp
                found.append((folder, path))
        self.looked, self.looked_at = looked, now
        return found


def run_watch(run: EditRun, watch: FolderWatch, make_items: Callable[[list[Found]], list], *, interval: float) -> None:
    """Edit what `watch` finds (its items made by `make_items`) until Ctrl-C or SIGTERM; then the summary, and
    the exit code of a stopped run."""
    from icdcli.core.stopping import exit_code

    run.report.stream = True
    say = run.report.reporter.say
    total = 0
    stopped = False  # a failure that stops any run (a full disk): the watch ends too
    with Interrupts(say) as interrupts:
        run.steps.interrupts = interrupts
        try:
            interrupts.droppable = True  # loading: nothing started, so SIGTERM stops at once
            run.session()
            interrupts.droppable = False
            folders = ", ".join(display(folder) for folder in watch.folders)
            say(f"watching {folders} for new images every {interval:g} s (Ctrl-C stops)")
            while not interrupts.requested and not stopped:
                ready = watch.ready()
                items = make_items(ready) if ready else []
                if items:
                    total += len(items)
                    run.steps.mark = time.perf_counter()  # an item's `total` seconds leave out the wait before it
                    pipeline = run.pipeline(interrupts)
                    pipeline.run(items)
                    stopped = pipeline.halted and not interrupts.requested  # a failure stopped it (`report`)
                if not stopped:
                    _wait(interval, interrupts)
        except KeyboardInterrupt as stop:
            sys.exit(exit_code(stop))
    seconds = time.perf_counter() - run.started
    load_seconds = run.loaded.seconds if run.loaded is not None else 0.0
    end = RunEnd(interrupted=not stopped, stopped=stopped, code=interrupts.code)
    run.report.summary(total, seconds, load_seconds, end)
    if stopped:
        raise RunFailed("stopped watching: fix the error above and watch again; finished outputs will be skipped")
    sys.exit(interrupts.code)


def _wait(seconds: float, interrupts: Interrupts) -> None:
    """Sleep `seconds`, or less when a stop is asked for."""
    end = time.monotonic() + seconds
    while not interrupts.requested and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def watched_items(
    found: list[Found],
    flags: EditFlags,
    *,
    targets: tuple[str, ...],
    output: str | None,
    any_output: bool,
    known: list[Found] | None = None,
) -> list:
    """The planned items of the files `FolderWatch` found (icd's own outputs left out), as a folder run that also
    holds the input files `known` from earlier looks would plan them: so `x.png` arriving after `x.jpg` was edited
    goes to `x-png-edit.png`, as a rerun would name it."""
    from icdcli.run.batch import path_item
    from icdcli.run.inputs import edits_of, is_icd_output
    from icdcli.run.planning import plan_edit_outputs

    new = {path for _, path in found if not is_icd_output(path)}
    if not new:
        return []
    found = [(folder, path) for folder, path in found if path in new]
    earlier = [(folder, path) for folder, path in known or () if path not in new]
    items = edits_of([path_item(path, path.relative_to(folder)) for folder, path in earlier + found], flags, targets)
    planned = plan_edit_outputs(items, output, spec=None, batch=True, anywhere=any_output, suffix=flags.suffix)
    return [item for item in planned if item.image in new]


def watch_folders(
    run: EditRun,
    folders: list[Path],
    *,
    recursive: bool,
    targets: tuple[str, ...],
    output: str | None,
    any_output: bool,
    interval: float | None = None,
) -> None:
    """`icd edit FOLDER... --watch`: edit what is in `folders` and what appears there (see the module); every
    `interval` seconds (None: `WATCH_INTERVAL`)."""
    watch = FolderWatch(folders, recursive=recursive)
    interval = WATCH_INTERVAL if interval is None else interval

    inputs: dict[Path, Path] = {}  # the input files of earlier looks (never icd's outputs), by their watched folder

    def make_items(found: list[Found]) -> list:
        known = [(folder, path) for path, folder in inputs.items() if os.path.lexists(path)]
        items = watched_items(found, run.flags, targets=targets, output=output, any_output=any_output, known=known)
        edited = {item.image for item in items}
        inputs.update((path, folder) for folder, path in found if path in edited)
        return items

    run_watch(run, watch, make_items, interval=interval)
