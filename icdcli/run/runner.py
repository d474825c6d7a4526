"""The batch runner of `icd edit`: edits planned items with one model through the batched pipeline (read ahead on
worker threads, edit in batches, write behind), reports each result and a summary, and stops cleanly on Ctrl-C or
SIGTERM.

Its parts: the items and settings (`icdcli.run.inputs`), the model's session (`icdcli.run.session`), each item's
steps (`icdcli.run.steps`), the lines it prints (`icdcli.run.report`), signals (`icdcli.run.signals`), `--jobs`
(`icdcli.run.jobs`) and the total over shards (`icdcli.run.shards`). The command line's options and help stay in
`icdcli.cli`, which hands the runner a model loader and a reporter; nothing here imports click.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from icdcli.core.errors import NO_SPACE_ERRNOS, ICDError, space_reason
from icdcli.run.batch import display
from icdcli.run.inputs import EditFlags, unused_p2p_note
from icdcli.run.model import Loaded, ModelLoader
from icdcli.run.report import Reporter, RunEnd, RunFailed, RunReport
from icdcli.run.session import EditSession
from icdcli.run.signals import Interrupts
from icdcli.run.steps import ItemSteps, RunError


class EditRun:
    """Edits items with one model through the batched pipeline; reports each result and a summary.

    Other item sources adapt the records and per-item P2P settings by a session of their own (`make_session`,
    as `icd bench pie` does); everything else (claims, resume, batching, Ctrl-C) is shared.
    """

    def __init__(
        self,
        flags: EditFlags,
        load: ModelLoader | None,
        *,
        batch: bool,
        overwrite: bool,
        reporter: Reporter = Reporter(),
        started: float | None = None,
        expected_hash: str | None = None,
        batch_size: int | None = None,
    ):
        """
        Args:
            flags: the edit the command line (or a caller) asks for; a spec row's values win over its request's.
            load: loads the model when the first item needs it (`adopt` instead gives one already loaded).
            batch: several items may come: a failed item fails alone, a progress bar and a summary are shown.
            overwrite: replace existing outputs (else those made with the same parameters are skipped).
            reporter: where the lines and JSON records go.
            started: when the command started (the summary's seconds run from here); None: now.
            expected_hash: the model hash of a recorded edit (`--from`): a warning when the model differs.
            batch_size: images per network call; None: by device and working size.
        """
        self.flags = flags
        self.load = load
        self.started = time.perf_counter() if started is None else started
        self.expected_hash = expected_hash
        self.report = RunReport(reporter, batch=batch)
        self.steps = ItemSteps(self.session, overwrite=overwrite, batch_size=batch_size, note=self.report.text)
        self.steps.mark = self.started
        self.shard: tuple[int, int] | None = None  # --shard auto: (rank, world size); rank 0 prints the total
        self._session: EditSession | None = None

    # --- the model ------------------------------------------------------------------------

    def session(self) -> EditSession:
        """The run's session on its model, loading the model first when it is not loaded yet."""
        if self._session is None:
            if self.load is None:
                raise RuntimeError("the run has no model: give a loader, or adopt a loaded model")
            try:
                loaded = self.load(self.flags.request.sampler == "ddim")
            except ICDError as error:  # a model that cannot load ends the whole run
                raise RunError(str(error)) from None
            except OSError as error:
                where = f" ({display(error.filename)})" if error.filename else ""
                if error.errno in NO_SPACE_ERRNOS:
                    raise RunError(
                        f"the model cannot be loaded: {space_reason(error)}{where}; free space (icd cache "
                        "prune --max-size SIZE keeps the cache to SIZE), set ICD_CACHE_DIR to a folder on another "
                        "disk, or use --backend torch"
                    ) from None
                raise RunError(
                    f"the model cannot be loaded: {error.strerror or error}{where}; check the model files and "
                    "ICD_CACHE_DIR (a writable cache folder)"
                ) from None
            self.adopt(loaded)
        assert self._session is not None
        return self._session

    def adopt(self, loaded: Loaded) -> None:
        """Run on a loaded model: its recipe under the flags, and its identity for the records."""
        self._session = self.make_session(loaded)
        note = unused_p2p_note(self.flags, self.flags.request.resolve(loaded.model.info).method)
        if note:
            logging.getLogger("icd").warning(note)
        if self.expected_hash and self.expected_hash != self._session.identity.hash:
            logging.getLogger("icd").warning(
                "the model differs from the one that made the recorded edit: the result will differ"
            )

    def make_session(self, loaded: Loaded) -> EditSession:
        """The session of this run's items on `loaded` (other item sources return their own)."""
        return EditSession(self.flags, loaded)

    @property
    def loaded(self) -> Loaded | None:
        return None if self._session is None else self._session.loaded

    # --- the loop -------------------------------------------------------------------------

    def pipeline(self, interrupts: Interrupts | None = None) -> Any:
        """The batched pipeline over this run's steps; a stop `interrupts` asked for ends it after the batch."""
        from icdcli.run.flow import BatchPipeline

        steps = self.steps
        return BatchPipeline(
            prepare=steps.prepare,
            group_key=steps.group_key,
            batch_limit=steps.batch_limit,
            run_group=steps.edit_group,
            write=steps.write,
            report=self.report.item,
            should_stop=lambda: interrupts is not None and interrupts.requested,
        )

    def _sweep(self, items: list) -> None:
        """Remove what runs killed before (SIGKILL, power loss) left in the output folders: temporary files, claims."""
        from icdcli.io.claims import sweep

        folders = {item.output.parent for item in items if item.error is None and item.output is not None}
        for folder in sorted(folders, key=str):
            removed = sweep(folder)
            if removed:
                self.report.text(
                    f"removed {len(removed)} unfinished file(s) of an earlier run that was killed, in {display(folder)}"
                )

    def edit(self, items: list) -> RunEnd:
        """Edit every item. Ctrl-C: stop after the current batch (twice: at once); SIGTERM: drop the current
        batch unless it is being written, then stop."""
        from icdcli.core.stopping import EXIT_INTERRUPTED, exit_code

        aborted = stopped = False
        code = EXIT_INTERRUPTED
        with Interrupts(self.report.reporter.say) as interrupts:
            self.steps.interrupts = interrupts
            self.report.open_bar(len(items))
            try:
                interrupts.droppable = True  # start-up: no item has started, so SIGTERM stops at once
                self._sweep(items)
                if any(item.error is None for item in items):
                    self.session()  # on this thread: Ctrl-C while loading stops at once
                interrupts.droppable = False
                stopped = not self.pipeline(interrupts).run(items) and not interrupts.requested
            except KeyboardInterrupt as stop:  # a second Ctrl-C, or SIGTERM: the current batch is dropped
                aborted = True
                code = exit_code(stop)
            finally:
                interrupts.droppable = False
                self.report.close_bar()
            interrupted = interrupts.requested or aborted
            code = max(code, interrupts.code)
        return RunEnd(interrupted, stopped, code)

    def run(self, items: list) -> None:
        """Edit every item, then print the summary and exit as the run ended (130 or 143 after a stop); RunFailed
        when items failed or a failure stopped the run."""
        end = self.edit(items)
        seconds = time.perf_counter() - self.started
        load_seconds = self.loaded.seconds if self.loaded is not None else 0.0
        self.report.summary(len(items), seconds, load_seconds, end)
        if end.interrupted:
            sys.exit(end.code)
        if self.shard is not None and self.shard[1] > 1:
            self._shard_total(seconds, load_seconds)
        if end.stopped:
            raise RunFailed("stopped: fix the error above and run again; finished outputs will be skipped")
        if self.report.tally.failed:
            edits = "edits" if any(getattr(item, "variant", None) for item in items) else "inputs"  # several --tgt
            raise RunFailed(f"{self.report.tally.failed} of {len(items)} {edits} failed")

    def run_jobs(self, stream: Any, *, output: str | None, any_output: bool) -> None:
        """`icd edit --jobs -`: one edit per JSON line of `stream` (`icdcli.run.jobs.run_jobs`)."""
        from icdcli.run.jobs import run_jobs

        run_jobs(self, stream, output=output, any_output=any_output)

    def _shard_total(self, seconds: float, load_seconds: float) -> None:
        """Under `accelerate launch ... --shard auto`: every process's summary gathered, the total printed by rank 0."""
        from icdcli.run.shards import gathered_total, total_line

        assert self.shard is not None, "a total is gathered only for a sharded run"
        total = gathered_total(self.report.tally.summary(seconds, load_seconds), *self.shard)
        if total is not None:
            self.report.json(total)
            self.report.reporter.say(total_line(total))
