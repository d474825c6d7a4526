"""Image files edited from Python as `icd edit` edits them (`ICDEditPipeline.edit_many`): the same items of files,
folders and spec rows, the same output planning, batching, claims, resume and records, through the same runner;
the results returned instead of printed."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from icdcli.diffusion.recipe import EditRequest
from icdcli.run.inputs import EditFlags
from icdcli.run.model import Loaded
from icdcli.run.report import ItemOutcome, Reporter


@dataclass(frozen=True)
class EditedFiles:
    """What a batch of files came to: each item's outcome in the items' order (`ItemOutcome.result` holds the record
    `icd edit --json` prints), the counts, and whether a failure every later item would share (a full disk, a
    read-only folder) stopped the run, leaving `not_reached` items for a rerun."""

    outcomes: list[ItemOutcome]
    done: int
    skipped: int
    failed: int
    not_reached: int
    stopped: bool


def edit_files(
    loaded: Loaded,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    source: str | None,
    target: str | None,
    *,
    request: EditRequest = EditRequest(),
    unguided: str | None = None,
    spec: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    any_output: bool = False,
    reporter: Reporter = Reporter(),
    mask: str | os.PathLike[str] | None = None,
    output_format: str = "png",
    quality: int | None = None,
) -> EditedFiles:
    """Edit `images` (files, or folders of them) and the rows of `spec` from `source` to `target` (a row's own
    prompts win) with the model `loaded`, as `icd edit IMAGE... [--spec SPEC] [-o OUTPUT]` does with the same
    settings: the same outputs, pixels and records.

    A failed item fails alone (its outcome says why); Ctrl-C stops after the current batch, then raises
    KeyboardInterrupt. Raises ValueError for nothing to edit or a missing prompt, SpecError for a spec that cannot
    be read, ICDError when no image is found or an output cannot be planned.
    """
    from icdcli.core.texts import check_text
    from icdcli.core.values import check_number
    from icdcli.run.inputs import collect_items
    from icdcli.run.planning import OUTPUT_FORMATS, plan_edit_outputs
    from icdcli.run.runner import EditRun

    started = time.perf_counter()
    paths = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(image) for image in images]
    if not paths and spec is None:
        raise ValueError("nothing to edit: give images (files or folders) or a spec")
    if spec is None and not (source and source.strip() and target and target.strip()):
        raise ValueError("give a source and a target prompt, or a spec whose rows give src and tgt")
    check_text("prompt", source, "the source prompt")
    check_text("prompt", target, "the target prompt")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"output_format is {', '.join(OUTPUT_FORMATS[:-1])} or {OUTPUT_FORMATS[-1]}, not {output_format!r}"
        )
    if quality is not None:
        check_number("quality", quality)
    flags = EditFlags(source, target, request, unguided, mask=None if mask is None else Path(mask),
                      suffix=f".{output_format}", quality=quality)  # fmt: skip
    spec_path = None if spec is None else Path(spec)
    items, batch = collect_items(paths, spec=spec_path, recursive=recursive, flags=flags, notify=reporter.say)
    target_path = None if output is None else os.fspath(output)
    items = plan_edit_outputs(items, target_path, spec=spec_path, batch=batch, anywhere=any_output,
                              suffix=flags.suffix)  # fmt: skip
    run = EditRun(flags, None, batch=True, overwrite=overwrite, reporter=reporter, started=started,
                  batch_size=batch_size)  # fmt: skip
    run.report.outcomes = []
    run.adopt(loaded)
    end = run.edit(items)
    run.report.summary(len(items), time.perf_counter() - started, loaded.seconds, end)
    if end.interrupted:
        raise KeyboardInterrupt
    tally = run.report.tally
    return EditedFiles(run.report.outcomes, tally.done, tally.skipped, tally.failed, tally.not_reached, end.stopped)
