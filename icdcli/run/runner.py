"""The batch runner of `icd edit`: reads the inputs (files, folders, a --spec, a --from record), plans
every output, then edits the items one after another with one model, reporting each and a summary.

The click command itself (its options and help) stays in cli.py and drives these pieces. Heavy imports
(torch, diffusers) happen inside the functions.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import MODEL_FLAGS, Loaded, load_model, say
from icdcli.core.texts import LINE_BYTES, check_text
from icdcli.core.values import NumberError, check_number, strict_json
from icdcli.diffusion.recipe import ALIGNED_TAIL, BLEND_THRESHOLD, EditRequest, P2POptions
from icdcli.run.outputs import image_text, path_from, recorded_path


@dataclass(frozen=True)
class EditFlags:
    """The command line's edit: its prompts (None: each spec row's) and what it asks of every edit (the values
    a spec row gives override the request's)."""

    source: str | None
    target: str | None
    request: EditRequest = EditRequest()
    unguided: str | None = None
    """Prompt swap: the prompt of the unguided steps, "source" or "target"; None: "source" (or a record's)."""


UNGUIDED_FIELD = "unguided_prompt"
"""The record field of a swap whose unguided steps use the target prompt (absent: the source, icd's default)."""


def match_fields() -> tuple[str, ...]:
    """The fields of an edit's record that decide its pixels: the batch's, and the unguided prompt of a swap."""
    from icdcli.run.batch import MATCH_FIELDS

    return (*MATCH_FIELDS, UNGUIDED_FIELD)


def unguided_record(method: str, unguided: str | None) -> dict[str, str]:
    """What a record adds for the unguided prompt: only a swap whose unguided steps take the target."""
    return {UNGUIDED_FIELD: "target"} if method == "swap" and unguided == "target" else {}


def p2p_options(
    cross_replace: float | None,
    self_replace: float | None,
    mode: str | None,
    blend_words: tuple[str, ...],
    blend_source: tuple[str, ...],
    blend_target: tuple[str, ...],
    amplify: tuple[tuple[str, float], ...],
    amplify_new: float | None,
    blend_threshold: float = BLEND_THRESHOLD,
    replace_tail: str = ALIGNED_TAIL,
) -> P2POptions:
    """The P2P values of the command line (a --blend value may hold several words); None: the model's."""

    def split(values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(w for value in values for w in value.split())

    return P2POptions(
        cross_replace=cross_replace,
        self_replace=self_replace,
        mode=mode,
        amplify_new=amplify_new,
        amplify=tuple(amplify),
        blend=split(blend_words),
        blend_source=split(blend_source),
        blend_target=split(blend_target),
        blend_threshold=blend_threshold,
        replace_tail=replace_tail,
    )


_P2P_FLAGS = (
    "cross_replace", "self_replace", "p2p_mode", "blend_words", "blend_source", "blend_target", "blend_threshold",
    "amplify", "amplify_new", "replace_tail",
)  # fmt: skip


def _given(name: str) -> bool:
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _recorded_number(record: dict[str, Any], key: str, name: str | None = None) -> Any:
    """A number of a record, checked like its flag; None when the record leaves it out."""
    value = record.get(key)
    return None if value is None else check_number(name or key, value)


def _recorded_request(record: dict[str, Any], flags: EditFlags) -> tuple[str | None, str | None, EditRequest]:
    """The prompts and request of a recorded edit, flags given on the command line winning (the P2P values
    all the record's unless a P2P flag is given)."""
    for key in ("src", "tgt"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{key} is not a prompt")
        check_text("prompt", record[key], key)
    given = flags.request
    sampler = given.sampler if _given("sampler") else record.get("sampler", "icd")
    ddim_steps = given.ddim_steps
    if sampler == "ddim" and not _given("ddim_steps") and record.get("sampler") == "ddim":
        ddim_steps = _recorded_number(record, "steps", "ddim_steps") or given.ddim_steps
    recorded_p2p = record.get("p2p")
    p2p = given.p2p
    if isinstance(recorded_p2p, dict) and not any(_given(name) for name in _P2P_FLAGS):
        p2p = P2POptions.from_record(recorded_p2p)
    request = EditRequest(
        method=given.method if _given("method") else record.get("method", "swap"),
        guidance=given.guidance if _given("guidance") else _recorded_number(record, "guidance"),
        tau=given.tau if _given("tau") else _recorded_number(record, "tau"),
        seed=given.seed if _given("seed") else int(check_number("seed", record["seed"])),
        sampler=sampler,
        ddim_steps=ddim_steps,
        p2p=p2p,
    )
    source = flags.source if _given("source") else record["src"]
    target = flags.target if _given("target") else record["tgt"]
    return source, target, request


def _recorded_unguided(record: dict[str, Any], flags: EditFlags) -> str | None:
    if _given("unguided_prompt"):
        return flags.unguided
    value = record.get(UNGUIDED_FIELD, "source")
    if value not in ("source", "target"):
        raise ValueError(f"{UNGUIDED_FIELD} is {value!r}, not source or target")
    return str(value)


def apply_record(
    path: Path, images: tuple[Path, ...], *, flags: EditFlags, model_opts: dict[str, Any]
) -> tuple[tuple[Path, ...], EditFlags, str | None]:
    """The inputs and settings of `icd edit --from OUTPUT.png`: the record's, except where flags are given."""
    from icdcli.io.images import read_record
    from icdcli.models.sources import DEFAULT_MODEL, PRESETS
    from icdcli.run.batch import display

    record = read_record(path) if path.is_file() else None
    if record is None or not {"src", "tgt", "seed"} <= record.keys():
        raise click.ClickException(f"--from {display(path)}: no icd edit record in it; give a PNG written by icd edit")
    try:
        source, target, request = _recorded_request(record, flags)
        unguided = _recorded_unguided(record, flags)
    except (NumberError, TypeError, ValueError, AttributeError) as error:
        raise click.ClickException(
            f"--from {display(path)}: its record is not usable ({error}); give the flags"
        ) from None
    expected_hash = None
    if not any(_given(name) for name in MODEL_FLAGS):
        model = str(record.get("model", DEFAULT_MODEL))
        if model not in PRESETS and model != DEFAULT_MODEL and not Path(model).is_dir():
            raise click.ClickException(
                f"--from {display(path)}: its model {model!r} is not a preset or a folder here; "
                "give --model (or --base/--base-config/--teacher/--forward-lora/--reverse-lora)"
            )
        model_opts["model"] = None if model == DEFAULT_MODEL else model
        expected_hash = record.get("model_hash")
    if not images:
        recorded = recorded_path(path, str(record.get("input", "")))
        if not recorded.is_file():
            raise click.ClickException(
                f"--from {display(path)}: its input {display(recorded)} is not there; give the IMAGE to edit"
            )
        images = (recorded,)
    return images, EditFlags(source, target, request, unguided), expected_hash


def _is_icd_output(path: Path) -> bool:
    from icdcli.io.images import read_record

    if path.suffix.lower() != ".png":
        return False
    record = read_record(path)
    return record is not None and "method" in record and "src" in record


def collect_items(images: list[Path], *, spec: Path | None, recursive: bool, flags: EditFlags) -> tuple[list, bool]:
    """The items to edit (folder outputs of icd itself are left out) and whether this is a batch."""
    from icdcli.run.batch import expand_inputs, read_spec, with_prompts

    items, any_folder = expand_inputs(images, recursive=recursive, skip=_is_icd_output)
    if spec is not None:
        items += read_spec(spec)
    items = _drop_repeats([with_prompts(item, flags.source, flags.target) for item in items])
    if not items:
        raise click.ClickException("no images found: folders are searched for image files (-r descends)")
    return items, any_folder or spec is not None or len(items) > 1


def _drop_repeats(items: list) -> list:
    """Items that are the same edit of the same file (a file named twice, or inside a folder also given)
    become one, with a note."""

    seen: dict[tuple, Any] = {}
    kept = []
    for item in items:
        if item.error is not None or item.image is None:
            kept.append(item)
            continue
        try:
            where = os.path.realpath(item.image)
        except (OSError, ValueError):
            where = str(item.image)
        identity = (where, item.src, item.tgt, item.guidance, item.tau, item.seed, item.output, item.blended_word,
                    item.replace_tail)  # fmt: skip
        if identity in seen:
            say(f"note: {item.label} is the same edit as {seen[identity].label}: made once")
            continue
        seen[identity] = item
        kept.append(item)
    return kept


_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # every later item would fail the same way


class _Reported(click.ClickException):
    """An error whose items --json has reported already (no second JSON line for it)."""

    reported = True


class _ItemFailed(Exception):
    """One item cannot be made; `fatal` stops the whole run (a full disk, say)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class _Interrupts:
    """First Ctrl-C: finish the current item, then stop. Second: stop at once (KeyboardInterrupt).

    SIGTERM: drop the current item if it has not started writing (Terminated), else finish it; then stop
    with exit code 143. `droppable` says whether the current item may still be dropped.
    """

    def __init__(self) -> None:
        from icdcli.core.stopping import EXIT_INTERRUPTED

        self.requested = False
        self.code = EXIT_INTERRUPTED
        self.droppable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        import contextlib
        import signal

        for signum, handler in ((signal.SIGINT, self._handle), (signal.SIGTERM, self._terminate)):
            with contextlib.suppress(ValueError):  # not the main thread: leave the signals as they are
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        say("stopping after the current image (Ctrl-C again to stop at once)")

    def _terminate(self, signum: int, frame: Any) -> None:
        from icdcli.core.stopping import EXIT_TERMINATED, Terminated

        first = self.code != EXIT_TERMINATED
        self.requested, self.code = True, EXIT_TERMINATED
        if self.droppable:
            self.droppable = False
            raise Terminated
        if first:
            say("terminating after the current image")

    def __exit__(self, *exc: Any) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _write_failure(error: OSError, out: Path) -> _ItemFailed:
    import errno

    from icdcli.run.batch import display

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return _ItemFailed(
            f"{display(out)}: no space left on the device; free space and run again (finished outputs are kept "
            "and will be skipped)",
            fatal=True,
        )
    if error.errno == errno.EROFS:
        return _ItemFailed(f"{display(out)}: the file system is read-only; choose another -o", fatal=True)
    reason = error.strerror or str(error)
    return _ItemFailed(f"{display(out)}: cannot write it ({reason}); check the folder or choose another -o")


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


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first."""
    from icdcli.run.batch import display

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
            _remove_empty(created)
            raise _ItemFailed(
                f"output folder {display(path)} cannot be created ({error.strerror or error}); choose another -o"
            ) from None
        created.append(path)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `_make_folders` created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


@dataclass(frozen=True)
class ItemOutcome:
    """What became of one item: its key, 'done', 'skipped' or 'failed', and the failure's message."""

    key: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class RunEnd:
    """How an `EditRun.edit` ended: stopped by Ctrl-C or SIGTERM (with its exit code), or by a fatal failure."""

    interrupted: bool
    stopped: bool
    code: int


@dataclass
class _Work:
    """What an item brings to the networks: its decoded image, its record, P2P settings and working size."""

    image: Any
    record: dict[str, Any]
    p2p: Any
    size: tuple[int, int]
    read_seconds: float


class EditRun:
    """Edits items with one model through the batched pipeline; reports each result and a summary.

    Subclasses adapt the records (`_wanted`, `_stored_record`) and per-item P2P settings (`_item_p2p`) of
    other item sources (`icd bench pie`); everything else (claims, resume, batching, Ctrl-C) is shared.
    """

    def __init__(
        self,
        flags: EditFlags,
        model_opts: dict[str, Any],
        as_json: bool,
        batch: bool,
        overwrite: bool,
        started: float,
        expected_hash: str | None = None,
        batch_size: int | None = None,
        jobs: bool = False,
    ):
        from icdcli.run.batch import Tally

        self.flags = flags
        self.model_opts = model_opts
        self.as_json = as_json
        self.batch = batch
        self.overwrite = overwrite
        self.started = started
        self.expected_hash = expected_hash
        self.batch_size = batch_size  # None: per device and working size (batch.default_batch_size)
        self.jobs = jobs
        self.quiet = False  # no line per written or skipped output (icd bench throughput)
        self.shard: tuple[int, int] | None = None  # --shard auto: (rank, world size); rank 0 prints the total
        self.loaded: Loaded | None = None
        self.p2p: Any = None  # icdcli.diffusion.p2p.P2PSettings: the flags over the model's recipe, once it is loaded
        self.model_hash = ""
        self.model_ref = ""
        self.model_files: Any = None  # icdcli.models.checkpoints.ModelFiles: what the `parameters` chunk names
        self.tally = Tally()
        self.bar: Any = None
        self.interrupts: _Interrupts | None = None
        self.noted: set[tuple[str, str]] = set()
        self.mark = started
        self.outcomes: list[ItemOutcome] | None = None  # every item's outcome, when a caller asks to keep them

    # --- reporting ------------------------------------------------------------------------

    def _text(self, message: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            say(message)

    def _json(self, record: dict[str, Any]) -> None:
        if self.as_json:
            click.echo(strict_json(record))

    def _failed(self, item: Any, message: str) -> None:
        self.tally.failed += 1
        self._note_outcome(item, "failed", message)
        output = None if item.output is None else str(item.output)
        self._json({"status": "failed", "input": None if item.image is None else str(item.image), "item": item.label,
                    "output": output, "error": message})  # fmt: skip
        if self.batch:
            self._text(f"Error: {message}")

    # --- the model ------------------------------------------------------------------------

    def _model(self) -> Loaded:
        if self.loaded is None:
            from icdcli.core.errors import ICDError
            from icdcli.run.batch import display

            opts = dict(self.model_opts)
            if opts.pop("_cuda_if_present", False):
                import torch

                if not torch.cuda.is_available():
                    opts["device"] = "auto"
            try:
                need_teacher = self.flags.request.sampler == "ddim"
                self.loaded = load_model(opts, need_teacher=need_teacher, backend=opts["backend"])
            except ICDError as error:  # a model that cannot load ends the whole run
                raise click.ClickException(str(error)) from None
            except OSError as error:
                where = f" ({display(error.filename)})" if error.filename else ""
                raise click.ClickException(
                    f"the model cannot be loaded: {error.strerror or error}{where}; check the model files and "
                    "ICD_CACHE_DIR (a writable cache folder)"
                ) from None
            self.adopt(self.loaded)
        return self.loaded

    def adopt(self, loaded: Loaded) -> None:
        """Run on a loaded model: its recipe under the flags, and its identity for the records."""
        from icdcli.models.checkpoints import model_files
        from icdcli.models.identity import model_hash

        self.loaded = loaded
        model = self.loaded.model
        try:
            self.p2p = self.flags.request.p2p.resolve(model.info.edit)
        except ValueError as error:  # P2PError: values the model's recipe and the flags cannot combine
            raise click.ClickException(str(error)) from None
        self.model_hash = model_hash(model)
        self.model_files = model_files(model)
        label = self.loaded.label
        self.model_ref = str(Path(label).resolve()) if Path(label).is_dir() else label
        if self.expected_hash and self.expected_hash != self.model_hash:
            logging.getLogger("icd").warning(
                "the model differs from the one that made the recorded edit: the result will differ"
            )

    # --- one item -------------------------------------------------------------------------

    def _item_p2p(self, item: Any) -> Any:
        """The P2P settings of one item: a spec row's `blended_word` ("source target") adds per-prompt blend words,
        its `replace_tail` chooses the rule of a replace edit's tail."""
        from dataclasses import replace

        settings = self.p2p
        if item.replace_tail is not None:
            settings = replace(settings, replace_tail=item.replace_tail)
        if not item.blended_word:
            return settings
        words = item.blended_word.split()
        if len(words) != 2:
            raise _ItemFailed(f"{item.label}: blended_word must be two words, the source's and the target's")
        return replace(settings, blend_source=(words[0],), blend_target=(words[1],))

    def _wanted(self, item: Any, input_sha: str, size: tuple[int, int] | None) -> dict[str, Any]:
        from icdcli import __version__
        from icdcli.run.batch import parameter_record

        loaded = self._model()
        model = loaded.model
        request = self.flags.request.overridden(guidance=item.guidance, tau=item.tau, seed=item.seed)
        edit = request.resolve(model.info)
        record = parameter_record(
            method=edit.method,
            p2p=self._item_p2p(item).to_record() if edit.method == "p2p" else None,
            model=self.model_ref,
            model_hash=self.model_hash,
            backend=loaded.backend,
            precision=str(model.dtype).removeprefix("torch."),
            sampler=edit.sampling.sampler,
            steps=edit.sampling.steps(model.info.num_steps),
            src=item.src,
            tgt=item.tgt,
            guidance=edit.guidance,
            tau=edit.tau,
            seed=edit.seed,
            version=__version__,
            input_path=path_from(item.output, item.image),
            input_size=size,
            input_sha256=input_sha,
        )
        return {**record, **unguided_record(edit.method, self.flags.unguided)}

    # --- one item, in three steps: prepare (reader thread), edit (in a batch), write (writer thread) ---

    def _prepare(self, item: Any) -> Any:
        """Check the input, claim the output and read the image; the reason it is skipped, or a `Prepared`."""
        from icdcli.core.errors import ICDError
        from icdcli.io.images import file_sha256, probe_image
        from icdcli.run.batch import display
        from icdcli.run.claims import claim, claim_owner
        from icdcli.run.flow import Prepared

        if item.error is not None:
            raise _ItemFailed(item.error)
        try:
            probe_image(item.image)
            input_sha = file_sha256(item.image)
        except ICDError as error:
            raise _ItemFailed(str(error)) from None
        except OSError as error:
            raise _ItemFailed(f"{display(item.image)}: cannot be read ({error.strerror or error})") from None
        out = item.output
        created = _make_folders(out.parent)
        try:
            held = claim(out)
        except OSError as error:
            _remove_empty(created)
            raise _write_failure(error, out) from None
        if held is None:
            _remove_empty(created)
            return f"being made by another icd run (process {claim_owner(out) or 'unknown'})"

        def discard() -> None:
            held.release()
            _remove_empty(created)

        try:
            work = self._read(item, input_sha)
        except BaseException:
            discard()
            raise
        if isinstance(work, str):
            discard()
            return work
        return Prepared(item, work, discard)

    def _read(self, item: Any, input_sha: str) -> _Work | str:
        """Decide on an output this process has claimed: why it is not needed, or its image and record."""
        from icdcli.core.errors import ICDError
        from icdcli.diffusion.editing import working_size
        from icdcli.io.images import load_image, original_size, read_record
        from icdcli.run.batch import decide, display

        out = item.output
        wanted = self._wanted(item, input_sha, None)
        exists = os.path.lexists(out)
        existing = read_record(out) if exists and not self.overwrite else None
        decision = decide(exists, existing, wanted, overwrite=self.overwrite, fields=match_fields())
        if decision.action == "skip":
            return decision.reason
        if decision.action == "refuse":
            raise _ItemFailed(f"{display(out)} {decision.reason}")
        model = self._model().model
        started = time.perf_counter()
        try:
            image = load_image(item.image, model.info.native_size**2)
        except ICDError as error:
            raise _ItemFailed(str(error)) from None
        record = {**wanted, "input_size": list(original_size(image))}
        p2p = self._item_p2p(item) if record["method"] == "p2p" else None
        return _Work(image, record, p2p, working_size(model, image), time.perf_counter() - started)

    def _group_key(self, prepared: Any) -> tuple:
        work = prepared.data
        return work.size, work.record["sampler"], work.record["method"]

    def _batch_limit(self, prepared: Any) -> int:
        from icdcli.run.batch import default_batch_size

        if self.batch_size is not None:
            return self.batch_size
        width, height = prepared.data.size
        return default_batch_size(self._model().model.device.type, width * height)

    def _edit_group(self, group: list) -> list:
        """Edit a group of prepared items in one batch: per item (image, seconds per stage) or its failure."""
        from icdcli.diffusion.editing import EditJob, SamplerSettings, Timings, edit_batch

        model = self._model().model
        for prepared in group:
            self._note_unknown_prompts(model, prepared.data.record)
            self._note_photo(prepared.data.image)
        jobs = [
            EditJob(w.image, w.record["src"], w.record["tgt"], w.record["guidance"], w.record["tau"], w.record["seed"],
                    w.p2p, w.record.get(UNGUIDED_FIELD, "source"))
            for w in (prepared.data for prepared in group)
        ]  # fmt: skip
        settings = SamplerSettings(group[0].data.record["sampler"], self.flags.request.ddim_steps)
        timings = Timings()
        if self.interrupts is not None:
            self.interrupts.droppable = True  # SIGTERM may drop a batch that has not started writing
        try:
            results = edit_batch(model, jobs, settings=settings, timings=timings)
        finally:
            if self.interrupts is not None:
                self.interrupts.droppable = False
        shared = {stage: seconds / len(group) for stage, seconds in timings.seconds.items()}
        return [
            result if isinstance(result, Exception) else (result, {**shared, "batch_size": len(group)})
            for result in results
        ]

    def _write(self, prepared: Any, result: tuple) -> dict[str, Any]:
        """Store one edited image (resized back to its input's size) with its record; the JSON record of it."""
        from PIL import Image

        from icdcli.core.errors import ICDError
        from icdcli.io.images import save_image
        from icdcli.run.batch import display

        item, work = prepared.item, prepared.data
        image, shared = result
        record, out = work.record, item.output
        try:
            started = time.perf_counter()
            size = tuple(record["input_size"])
            if image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
            try:
                if not os.access(out.parent, os.W_OK | os.X_OK):
                    raise _ItemFailed(f"output folder {display(out.parent)} is not writable: choose another with -o")
                save_image(image, out, text=image_text(self._stored_record(record, shared), self.model_files))
            except ICDError as error:
                raise _ItemFailed(str(error)) from None
            except OSError as error:
                raise _write_failure(error, out) from None
        finally:
            prepared.discard()  # the claim: the output exists now, or failed
        now = time.perf_counter()
        seconds = {"load": self._model().seconds, "read": work.read_seconds, **shared, "write": now - started,
                   "total": now - self.mark}  # fmt: skip
        self.mark = now
        return {
            "status": "done",
            "input": str(item.image),
            "output": str(out),
            "model": self._model().label,
            "backend": self._model().backend,
            "seed": record["seed"],
            "sampler": record["sampler"],
            "method": record["method"],
            "guidance": record["guidance"],
            "tau": record["tau"],
            "steps": record["steps"],
            "src": record["src"],
            "tgt": record["tgt"],
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }

    def _stored_record(self, record: dict[str, Any], seconds: dict[str, Any]) -> dict[str, Any]:
        """The record an output carries, given the seconds of its batch per item (icd edit's: the record)."""
        return record

    def _note_photo(self, image: Any) -> None:
        """Say once, before the edit, when the embedded model gets an image unlike its scenes (a photo)."""
        from icdcli.models.sources import DEFAULT_MODEL, preset_fetch_commands
        from icdcli.run.first_photo import looks_like_a_scene, photo_note

        if ("photo", "") in self.noted or self._model().label != DEFAULT_MODEL or looks_like_a_scene(image):
            return
        self.noted.add(("photo", ""))
        self._text(photo_note(preset_fetch_commands("sd15")))

    def _note_unknown_prompts(self, model: Any, wanted: dict[str, Any]) -> None:
        """Say once per prompt when the model knows none of its words."""
        from icdcli.models.prompts import unknown_prompt_note

        for flag, prompt in (("--src", wanted["src"]), ("--tgt", wanted["tgt"])):
            if (flag, prompt) not in self.noted:
                self.noted.add((flag, prompt))
                note = unknown_prompt_note(model, prompt, flag)
                if note:
                    self._text(f"note: {note}")

    def _failure(self, item: Any, error: BaseException) -> _ItemFailed:
        """The one-line failure of an item; anything unforeseen (a bug, a library's surprise) fails that item alone."""
        if isinstance(error, (_ItemFailed, click.ClickException)):
            return error  # type: ignore[return-value]
        from icdcli.core.errors import ICDError
        from icdcli.diffusion.p2p import P2PError

        if isinstance(error, (ICDError, P2PError)):
            return _ItemFailed(str(error))
        logging.getLogger("icd").debug("%s failed", item.label, exc_info=error)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        fatal = isinstance(error, OSError) and error.errno in _FATAL_ERRNOS
        return _ItemFailed(f"{item.label}: failed ({type(error).__name__}{': ' + reason if reason else ''})", fatal)

    # --- the loop -------------------------------------------------------------------------

    def _report(self, item: Any, outcome: Any) -> bool:
        """Report one item's outcome (a record, a skip reason or an ItemError); False when the run must stop."""
        from icdcli.run.batch import display
        from icdcli.run.flow import ItemError

        if isinstance(outcome, ItemError):
            failure = self._failure(item, outcome.error)
            if isinstance(failure, click.ClickException):
                raise failure
            if not self.batch:
                if self.as_json:
                    self._failed(item, str(failure))
                raise _Reported(str(failure)) from None
            self._failed(item, str(failure))
            self._advance()
            return not failure.fatal
        if isinstance(outcome, str):
            self.tally.skipped += 1
            self._note_outcome(item, "skipped")
            self._json({"status": "skipped", "input": str(item.image), "output": str(item.output), "reason": outcome})
            again = " (--overwrite makes it again)" if outcome.startswith("already made") else ""
            if not self.quiet:
                self._text(f"skipped {display(item.output)}: {outcome}{again}")
        else:
            self.tally.done += 1
            self._note_outcome(item, "done")
            self._json(outcome)
            if not self.as_json and not self.quiet:
                self._text(f"wrote {display(item.output)}")
        self._advance()
        return True

    def _note_outcome(self, item: Any, status: str, error: str | None = None) -> None:
        if self.outcomes is not None:
            self.outcomes.append(ItemOutcome(item.key, status, error))

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.jobs:
            sys.stdout.flush()

    def pipeline(self) -> Any:
        from icdcli.run.flow import BatchPipeline

        return BatchPipeline(
            prepare=self._prepare,
            group_key=self._group_key,
            batch_limit=self._batch_limit,
            run_group=self._edit_group,
            write=self._write,
            report=self._report,
            should_stop=lambda: self.interrupts is not None and self.interrupts.requested,
        )

    def _sweep(self, items: list) -> None:
        """Remove what runs killed before (SIGKILL, power loss) left in the output folders: temporary files, claims."""
        from icdcli.run.batch import display
        from icdcli.run.claims import sweep

        folders = {item.output.parent for item in items if item.error is None and item.output is not None}
        for folder in sorted(folders, key=str):
            removed = sweep(folder)
            if removed:
                self._text(
                    f"removed {len(removed)} unfinished file(s) of an earlier run that was killed, in {display(folder)}"
                )

    def run(self, items: list) -> None:
        """Edit every item, then print the summary and exit as the run ended (130 or 143 after a stop)."""
        end = self.edit(items)
        self._finish(len(items), end.interrupted, end.stopped, end.code)

    def edit(self, items: list) -> RunEnd:
        """Edit every item. Ctrl-C: stop after the current batch (twice: at once); SIGTERM: drop the current
        batch unless it is being written, then stop."""
        from tqdm import tqdm

        from icdcli.core.stopping import EXIT_INTERRUPTED, exit_code

        interrupted = aborted = stopped = False
        code = EXIT_INTERRUPTED
        with _Interrupts() as interrupts:
            self.interrupts = interrupts
            self.bar = tqdm(total=len(items), desc="editing", unit="image", file=sys.stderr,
                            disable=(not self.batch) or None, dynamic_ncols=True)  # fmt: skip
            try:
                interrupts.droppable = True  # start-up: no item has started, so SIGTERM stops at once
                self._sweep(items)
                if any(item.error is None for item in items):
                    self._model()  # on this thread: Ctrl-C while loading stops at once
                interrupts.droppable = False
                stopped = not self.pipeline().run(items) and not interrupts.requested
            except KeyboardInterrupt as stop:  # a second Ctrl-C, or SIGTERM: the current batch is dropped
                aborted = True
                code = exit_code(stop)
            finally:
                interrupts.droppable = False
                self.bar.close()
            interrupted = interrupts.requested or aborted
            code = max(code, interrupts.code)
        return RunEnd(interrupted, stopped, code)

    def run_jobs(self, stream: Any, *, output: str | None, any_output: bool) -> None:
        """`icd edit --jobs -`: one edit per JSON line of `stream`, one JSON result line each, until end of input.

        The model loads once, before the first line is read. A line that cannot be used gives a failed line.
        """
        import json

        from icdcli.run.batch import spec_row, with_prompts
        from icdcli.run.planning import plan_items

        folder = None
        if output is not None:
            folder = Path(output)
            if not folder.is_dir():
                raise click.UsageError(f"-o {output}: with --jobs, -o is a folder that exists (outputs go inside)")
        with _Interrupts() as interrupts:
            self.interrupts = interrupts
            try:
                interrupts.droppable = True  # SIGTERM while loading: nothing started, so stop at once
                self._model()
                interrupts.droppable = False
                for number, line in enumerate(_bounded_lines(stream), start=1):
                    if line is None:
                        raw = None
                        item = _job_error(number, f"the line is longer than {LINE_BYTES:,} characters (icd's text "
                                                  "limits); shorten its prompts")  # fmt: skip
                    elif not line.strip():
                        continue
                    else:
                        try:
                            raw = json.loads(line)
                        except json.JSONDecodeError as error:
                            raw = None
                            item = _job_error(number, f"not a JSON object ({error})")
                    if raw is not None:
                        item = with_prompts(spec_row(raw, number, Path("-")), self.flags.source, self.flags.target)
                        item = plan_items([item], folder, spec_out=Path("."), anywhere=any_output)[0]
                    self.pipeline().run([item])
                    if interrupts.requested:
                        break
            except KeyboardInterrupt as stop:
                from icdcli.core.stopping import exit_code

                sys.exit(exit_code(stop))
        seconds = time.perf_counter() - self.started
        say(self.tally.line(seconds, interrupts.requested))
        if interrupts.requested:
            sys.exit(interrupts.code)

    def _finish(self, total: int, interrupted: bool, stopped: bool, code: int = 130) -> None:
        from icdcli.core.stopping import EXIT_TERMINATED

        seconds = time.perf_counter() - self.started
        self.tally.not_reached = max(0, total - self.tally.reached())
        if self.batch or interrupted:
            load_seconds = self.loaded.seconds if self.loaded is not None else 0.0
            self._json(self.tally.summary(seconds, load_seconds))
            line = self.tally.line(seconds, interrupted)
            say(line.replace("interrupted:", "terminated:", 1) if code == EXIT_TERMINATED else line)
        if interrupted:
            sys.exit(code)
        if self.shard is not None and self.shard[1] > 1:
            self._shard_total(seconds)
        if stopped:
            raise _Reported("stopped: fix the error above and run again; finished outputs will be skipped")
        if self.tally.failed:
            raise _Reported(f"{self.tally.failed} of {total} inputs failed")

    def _shard_total(self, seconds: float) -> None:
        """Under `accelerate launch ... --shard auto`: every process's summary gathered, the total printed by rank 0.

        The processes meet through torch.distributed (gloo, the launcher's MASTER_ADDR/MASTER_PORT) once each
        has finished; without a launcher's rendezvous there is no total, only each process's own summary.
        """
        import datetime

        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return
        import torch.distributed as dist

        from icdcli.run.batch import total_summary

        mine = self.tally.summary(seconds, self.loaded.seconds if self.loaded is not None else 0.0)
        assert self.shard is not None, "a total is gathered only for a sharded run"
        rank, world = self.shard
        try:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=7))
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            dist.destroy_process_group()
        except (RuntimeError, ValueError, OSError) as error:
            logging.getLogger("icd").warning("no total over the shards: the processes could not meet (%s)", error)
            return
        if rank == 0:
            total = total_summary(gathered)
            self._json(total)
            say(
                f"total over {world} processes: {total['done']} done, {total['skipped']} skipped, "
                f"{total['failed']} failed in {total['seconds']:.1f} s ({total['images_per_second']:.2f} images/s)"
            )


# --- icd edit --latents: a new target on a saved inversion ------------------------------------------------


def latents_output(latents: Path, output: str | None) -> Path:
    """Where `icd edit --latents FILE` writes: -o (a file, or a folder to write into), else beside FILE, named
    after it (`cat.latent.safetensors` -> `cat-edit.png`)."""
    name = latents.name
    for suffix in (".latent.safetensors", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    default = f"{name}-edit.png"
    if output is None:
        return latents.parent / default
    return Path(output) / default if Path(output).is_dir() else Path(output)


def edit_latents(
    latents: Path,
    flags: EditFlags,
    *,
    output: str | None,
    overwrite: bool,
    as_json: bool,
    model_opts: dict[str, Any],
    started: float,
) -> None:
    """`icd edit --latents FILE`: decode a saved inversion (`icd invert`) under the target prompt, with any
    guidance, tau, method and P2P settings; the output's record is the one a whole edit of the same input with
    the same settings writes (its pixels are the same), plus the latent file it came from (`latents`)."""
    from dataclasses import replace

    from icdcli import __version__
    from icdcli.core.errors import ICDError
    from icdcli.diffusion.editing import InversionError, Timings, edit_inversion, load_inversion
    from icdcli.diffusion.p2p import P2PError
    from icdcli.io.images import OUTPUT_SUFFIXES, read_record, save_image
    from icdcli.models.checkpoints import model_files
    from icdcli.models.identity import model_hash
    from icdcli.run.batch import decide, display, parameter_record
    from icdcli.run.outputs import emit

    try:
        inversion = load_inversion(latents)
    except InversionError as error:
        raise click.ClickException(f"--latents {error}") from None
    if flags.target is None:
        raise click.UsageError("--tgt is needed: --latents holds the source prompt, --tgt describes the result")
    if flags.source is not None and flags.source != inversion.prompt:
        raise click.UsageError(
            f"--src {flags.source!r} is not the prompt the latents were inverted with ({inversion.prompt!r}): leave "
            "--src out, or invert the image again with icd invert --prompt"
        )
    request = flags.request
    made = inversion.settings
    if request.seed is not None and request.seed != made.seed:
        raise click.UsageError(
            f"--seed {request.seed}: the latents were inverted with seed {made.seed}; leave --seed out, or invert "
            "the image again with icd invert --seed"
        )
    if not _given("sampler"):  # the inversion's sampler (and DDIM steps) unless one is asked for
        request = replace(request, sampler=made.sampler, ddim_steps=made.ddim_steps)
    request = replace(request, seed=made.seed)
    out = latents_output(latents, output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.UsageError(f"-o {out}: write an image ({', '.join(sorted(OUTPUT_SUFFIXES))})")
    loaded = load_model(model_opts, need_teacher=request.sampler == "ddim", backend=model_opts["backend"])
    model = loaded.model
    try:
        resolved = request.resolve(model.info)
    except ValueError as error:  # P2PError: values the model's recipe and the flags cannot combine
        raise click.ClickException(str(error)) from None
    where = f"--latents {display(latents)}"
    recorded = inversion.record
    image_path = recorded_path(latents, str(recorded["input"])) if recorded.get("input") else latents
    input_size = recorded.get("input_size") or list(inversion.original_size)
    wanted = parameter_record(
        method=resolved.method,
        p2p=resolved.p2p.to_record() if resolved.method == "p2p" else None,
        model=str(Path(loaded.label).resolve()) if Path(loaded.label).is_dir() else loaded.label,
        model_hash=model_hash(model),
        backend=loaded.backend,
        precision=str(model.dtype).removeprefix("torch."),
        sampler=resolved.sampling.sampler,
        steps=resolved.sampling.steps(model.info.num_steps),
        src=inversion.prompt,
        tgt=flags.target,
        guidance=resolved.guidance,
        tau=resolved.tau,
        seed=resolved.seed,
        version=__version__,
        input_path=path_from(out, image_path),
        input_size=tuple(input_size),
        input_sha256=str(recorded.get("input_sha256", "")),
    )
    wanted = {**wanted, **unguided_record(resolved.method, flags.unguided), "latents": path_from(out, latents)}
    exists = os.path.lexists(out)
    existing = read_record(out) if exists and not overwrite else None
    decision = decide(exists, existing, wanted, overwrite=overwrite, fields=match_fields())
    result: dict[str, Any] = {"input": str(latents), "output": str(out), "model": loaded.label,
                              "backend": loaded.backend, "seed": resolved.seed}  # fmt: skip
    if decision.action == "refuse":
        raise click.ClickException(f"{display(out)} {decision.reason}")
    if decision.action == "skip":
        emit(as_json, {"status": "skipped", **result, "reason": decision.reason})
        return
    from icdcli.models.prompts import unknown_prompt_note

    note = unknown_prompt_note(model, flags.target, "--tgt")
    if note:
        say(f"note: {note}")
    timings = Timings({"load": loaded.seconds})
    try:
        edited = edit_inversion(model, inversion, flags.target, guidance=resolved.guidance, tau=resolved.tau,
                                settings=resolved.sampling, p2p=resolved.p2p, unguided=flags.unguided or "source",
                                timings=timings)  # fmt: skip
    except InversionError as error:
        raise click.ClickException(f"{where}: {error} (icd invert IMAGE --prompt ...)") from None
    except (P2PError, ICDError) as error:
        raise click.ClickException(str(error)) from None
    if list(edited.size) != list(input_size):
        from PIL import Image

        edited = edited.resize((int(input_size[0]), int(input_size[1])), Image.Resampling.LANCZOS)
    with timings.stage("write"):
        save_image(edited, out, text=image_text(wanted, model_files(model)))
    timings.seconds["total"] = time.perf_counter() - started
    emit(as_json, {"status": "done", **result, "method": resolved.method, "guidance": resolved.guidance,
                   "tau": resolved.tau, "src": inversion.prompt, "tgt": flags.target,
                   "seconds": {k: round(v, 4) for k, v in timings.seconds.items()}})  # fmt: skip
