"""One item of a batch edit in the three steps `icdcli.run.flow.BatchPipeline` runs: prepare (on a reader thread:
check the input, claim the output, decide whether it is needed, read the image), edit (a group of items in one
batch) and write (on the writer thread: the image with its record); and the one-line failure of an item."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.core.errors import ICDError
from icdcli.run.batch import display
from icdcli.run.outputs import image_text
from icdcli.run.records import UNGUIDED_FIELD, match_fields

if TYPE_CHECKING:
    from icdcli.run.session import EditSession
    from icdcli.run.signals import Interrupts

_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # every later item would fail the same way

ECHOED_FIELDS = ("precision", "seed", "sampler", "method", "guidance", "tau", "steps", "src", "tgt")
"""The fields of an output's record that its `--json` line repeats."""


class ItemFailed(Exception):
    """One item cannot be made; `fatal` stops the whole run (a full disk, say)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class RunError(ICDError):
    """A failure that ends the whole run, not one item: the model cannot load, or the flags and its recipe cannot
    combine."""


def item_failure(item: Any, error: BaseException) -> ItemFailed | RunError:
    """The one-line failure of an item; anything unforeseen (a bug, a library's surprise) fails that item alone."""
    if isinstance(error, (ItemFailed, RunError)):
        return error
    from icdcli.diffusion.recipe import P2PError

    if isinstance(error, (ICDError, P2PError)):
        return ItemFailed(str(error))
    logging.getLogger("icd").debug("%s failed", item.label, exc_info=error)
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    fatal = isinstance(error, OSError) and error.errno in _FATAL_ERRNOS
    return ItemFailed(f"{item.label}: failed ({type(error).__name__}{': ' + reason if reason else ''})", fatal)


def write_failure(error: OSError, out: Path) -> ItemFailed:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ItemFailed(
            f"{display(out)}: no space left on the device; free space and run again (finished outputs are kept "
            "and will be skipped)",
            fatal=True,
        )
    if error.errno == errno.EROFS:
        return ItemFailed(f"{display(out)}: the file system is read-only; choose another -o", fatal=True)
    reason = error.strerror or str(error)
    return ItemFailed(f"{display(out)}: cannot write it ({reason}); check the folder or choose another -o")


def fitted(mask: Any, image: Any) -> Any:
    """The mask at the size the image was read at (smaller than the file's when a large JPEG was read reduced)."""
    from PIL import Image

    return mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.BILINEAR)


def full_size_paste(photo: Path, edited: Any, mask: Any) -> Any:
    """An edit of a photo read at reduced scale, given the file's full-size pixels outside its mask."""
    from icdcli.editing.region import paste_outside
    from icdcli.io.images import load_image

    try:
        full = load_image(photo)
    except ICDError as error:
        raise ItemFailed(str(error)) from None
    return paste_outside(full, edited, mask)


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            remove_empty(created)
            raise ItemFailed(
                f"output folder {display(path)} cannot be created ({error.strerror or error}); choose another -o"
            ) from None
        created.append(path)
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders `make_folders` created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


@dataclass
class Work:
    """What an item brings to the networks: its decoded image, its record, P2P settings and working size."""

    image: Any
    record: dict[str, Any]
    p2p: Any
    size: tuple[int, int]
    read_seconds: float
    mask: Any = None
    """The item's mask at the input's own size (`icdcli.io.images.load_mask`); None: it edits the whole image."""
    exif: bytes | None = None
    """The input's EXIF for its output (`--keep-exif`); None: none."""


class ItemSteps:
    """The steps of every item of one run, on the session's model (loaded when an item first needs it)."""

    def __init__(
        self,
        session: Callable[[], EditSession],
        *,
        overwrite: bool,
        batch_size: int | None,
        note: Callable[[str], None],
    ) -> None:
        self.session = session
        self.overwrite = overwrite
        self.batch_size = batch_size  # None: per device and working size (batch.default_batch_size)
        self.note = note  # a line for the user (above the progress bar)
        self.noted: set[tuple[str, str]] = set()
        self.mark = time.perf_counter()  # the end of the last item written: its `total` seconds run from here
        self.interrupts: Interrupts | None = None

    def prepare(self, item: Any) -> Any:
        """Check the input, claim the output and read the image; the reason it is skipped, or a `Prepared`."""
        from icdcli.io.claims import claim, claim_owner
        from icdcli.io.images import file_sha256, probe_image
        from icdcli.run.flow import Prepared

        if item.error is not None:
            raise ItemFailed(item.error)
        mask = getattr(item, "mask", None)
        mask_sha = None
        reading = item.image
        try:
            probe_image(item.image)
            input_sha = file_sha256(item.image)
            if mask is not None:
                reading = mask
                probe_image(mask)
                mask_sha = file_sha256(mask)
        except ICDError as error:
            raise ItemFailed(f"mask {error}" if reading is mask else str(error)) from None
        except OSError as error:
            what = "mask " if reading is mask else ""
            raise ItemFailed(f"{what}{display(reading)}: cannot be read ({error.strerror or error})") from None
        out = item.output
        created = make_folders(out.parent)
        try:
            held = claim(out)
        except OSError as error:
            remove_empty(created)
            raise write_failure(error, out) from None
        if held is None:
            remove_empty(created)
            return f"being made by another icd run (process {claim_owner(out) or 'unknown'})"

        def discard() -> None:
            held.release()
            remove_empty(created)

        try:
            work = self._read(item, input_sha, mask_sha)
        except BaseException:
            discard()
            raise
        if isinstance(work, str):
            discard()
            return work
        return Prepared(item, work, discard)

    def _read(self, item: Any, input_sha: str, mask_sha: str | None = None) -> Work | str:
        """Decide on an output this process has claimed: why it is not needed, or its image and record."""
        from icdcli.editing.stages import working_size
        from icdcli.io.images import format_problem, input_exif, load_image, load_mask, original_size, read_record
        from icdcli.run.batch import decide

        session = self.session()
        out = item.output
        wanted = session.wanted(item, input_sha, None, mask_sha)
        exists = os.path.lexists(out)
        existing = read_record(out) if exists and not self.overwrite else None
        decision = decide(exists, existing, wanted, overwrite=self.overwrite, fields=match_fields())
        if decision.action == "skip":
            return decision.reason
        if decision.action == "refuse":
            raise ItemFailed(f"{display(out)} {decision.reason}")
        model = session.loaded.model
        started = time.perf_counter()
        try:
            image = load_image(item.image, model.info.native_size**2)
            mask = None if mask_sha is None else load_mask(item.mask, original_size(image), photo=item.image)
        except ICDError as error:
            raise ItemFailed(str(error)) from None
        problem = format_problem(original_size(image), out)  # before the edit, not after it
        if problem is not None:
            raise ItemFailed(f"{display(out)}: {problem}")
        record = {**wanted, "input_size": list(original_size(image))}
        p2p = session.item_p2p(item) if record["method"] == "p2p" else None
        exif = input_exif(item.image) if getattr(session.flags, "keep_exif", False) else None
        return Work(image, record, p2p, working_size(model, image), time.perf_counter() - started, mask, exif)

    def group_key(self, prepared: Any) -> tuple:
        work = prepared.data
        return work.size, work.record["sampler"], work.record["method"]

    def batch_limit(self, prepared: Any) -> int:
        from icdcli.run.batch import default_batch_size

        if self.batch_size is not None:
            return self.batch_size
        width, height = prepared.data.size
        return default_batch_size(self.session().loaded.model.device.type, width * height)

    def edit_group(self, group: list) -> list:
        """Edit a group of prepared items in one batch: per item (image, seconds per stage) or its failure."""
        from icdcli.diffusion.recipe import SamplerSettings
        from icdcli.editing.edits import EditJob, edit_batch
        from icdcli.editing.reuse import model_inversions
        from icdcli.editing.stages import Timings

        session = self.session()
        model = session.loaded.model
        for prepared in group:
            self._note_unknown_prompts(model, prepared.data.record)
            self._note_photo(prepared.data.image)
        jobs = [
            EditJob(w.image, w.record["src"], w.record["tgt"], w.record["guidance"], w.record["tau"], w.record["seed"],
                    w.p2p, w.record.get(UNGUIDED_FIELD, "source"), None if w.mask is None else fitted(w.mask, w.image))
            for w in (prepared.data for prepared in group)
        ]  # fmt: skip
        settings = SamplerSettings(group[0].data.record["sampler"], session.flags.request.ddim_steps)
        timings = Timings()
        if self.interrupts is not None:
            self.interrupts.droppable = True  # SIGTERM may drop a batch that has not started writing
        try:
            results = edit_batch(model, jobs, settings=settings, timings=timings, inversions=model_inversions(model))
        finally:
            if self.interrupts is not None:
                self.interrupts.droppable = False
        shared = {stage: seconds / len(group) for stage, seconds in timings.seconds.items()}
        return [
            result if isinstance(result, Exception) else (result, {**shared, "batch_size": len(group)})
            for result in results
        ]

    def write(self, prepared: Any, result: tuple) -> dict[str, Any]:
        """Store one edited image (resized back to its input's size) with its record; the JSON record of it."""
        from PIL import Image

        from icdcli.io.images import save_image

        session = self.session()
        item, work = prepared.item, prepared.data
        image, shared = result
        record, out = work.record, item.output
        try:
            started = time.perf_counter()
            size = tuple(record["input_size"])
            if image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
                if work.mask is not None:  # read at reduced scale: the photo's own pixels come from the file
                    image = full_size_paste(item.image, image, work.mask)
            try:
                if not os.access(out.parent, os.W_OK | os.X_OK):
                    raise ItemFailed(f"output folder {display(out.parent)} is not writable: choose another with -o")
                stored = session.stored_record(record, shared)
                save_image(image, out, text=image_text(stored, session.identity.files), exif=work.exif,
                           quality=getattr(session.flags, "quality", None))  # fmt: skip
            except ICDError as error:
                raise ItemFailed(str(error)) from None
            except OSError as error:
                raise write_failure(error, out) from None
        finally:
            prepared.discard()  # the claim: the output exists now, or failed
        now = time.perf_counter()
        loaded = session.loaded
        seconds = {"load": loaded.seconds, "read": work.read_seconds, **shared, "write": now - started,
                   "total": now - self.mark}  # fmt: skip
        self.mark = now
        return {
            "status": "done",
            "input": str(item.image),
            "output": str(out),
            "model": loaded.label,
            "backend": loaded.backend,
            **{key: record[key] for key in ECHOED_FIELDS},
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }

    def _note_photo(self, image: Any) -> None:
        """Say once, before the edit, when the embedded model gets an image unlike its scenes (a photo)."""
        from icdcli.models.sources import DEFAULT_MODEL, preset_fetch_commands
        from icdcli.run.first_photo import looks_like_a_scene, photo_note

        if ("photo", "") in self.noted or self.session().loaded.label != DEFAULT_MODEL or looks_like_a_scene(image):
            return
        self.noted.add(("photo", ""))
        self.note(photo_note(preset_fetch_commands("sd15")))

    def _note_unknown_prompts(self, model: Any, wanted: dict[str, Any]) -> None:
        """Say once per prompt when the model knows none of its words."""
        from icdcli.models.prompts import unknown_prompt_note

        for flag, prompt in (("--src", wanted["src"]), ("--tgt", wanted["tgt"])):
            if (flag, prompt) not in self.noted:
                self.noted.add((flag, prompt))
                note = unknown_prompt_note(model, prompt, flag)
                if note:
                    self.note(f"note: {note}")
