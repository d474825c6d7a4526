"""What `icd edit` edits and with which settings: the command line's edit (`EditFlags`), the items of files, folders
and a --spec (`collect_items`), and a recorded edit repeated with `--from` (`apply_record`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError
from icdcli.core.texts import check_text
from icdcli.core.values import NumberError, check_number
from icdcli.diffusion.recipe import ALIGNED_TAIL, BLEND_THRESHOLD, SOURCE_BRANCH, EditRequest, P2POptions
from icdcli.run.outputs import recorded_path
from icdcli.run.records import MASK_FIELD, UNGUIDED_FIELD, UPLOADED_MASK
from icdcli.run.report import log_line

MODEL_FLAGS = (
    "model", "base", "base_config", "teacher", "forward_lora", "reverse_lora", "forward_boundaries",
    "reverse_boundaries",
)  # fmt: skip
"""The options that choose the model (as opposed to where and how it runs)."""

_P2P_FLAGS = (
    "cross_replace", "self_replace", "p2p_mode", "blend_words", "blend_source", "blend_target", "blend_threshold",
    "amplify", "amplify_new", "replace_tail", "blend_keep",
)  # fmt: skip


_FLAG_NAMES = {"blend_words": "--blend", "blend_source": "--blend-src", "blend_target": "--blend-tgt"}


def unused_p2p_note(flags: EditFlags, method: str) -> str | None:
    """A note when Prompt-to-Prompt flags were given to a run that edits by prompt swap (`method`: the resolved
    method, one for the whole run); None otherwise."""
    given = [name for name in _P2P_FLAGS if name in flags.given]
    if not given or method == "p2p":
        return None
    shown = ", ".join(_FLAG_NAMES.get(name, "--" + name.replace("_", "-")) for name in given)
    return f"{shown} not used: this run edits by prompt swap (give --method p2p for Prompt-to-Prompt)"


@dataclass(frozen=True)
class EditFlags:
    """The command line's edit: its prompts (None: each spec row's) and what it asks of every edit (the values
    a spec row gives override the request's)."""

    source: str | None
    target: str | None
    request: EditRequest = EditRequest()
    unguided: str | None = None
    """Prompt swap: the prompt of the unguided steps, "source" or "target"; None: "source" (or a record's)."""
    given: frozenset[str] = frozenset()
    """The parameters given on the command line (not defaults): they win over a recorded edit's (`apply_record`)."""
    mask: Path | None = None
    """The region every edit may change (white where it may; `icdcli.editing.region`) unless a row gives its own."""
    keep_exif: bool = False
    """Copy each input's EXIF into its output (`icdcli.io.images.input_exif`)."""
    suffix: str = ".png"
    """The default outputs' format (`--format`): `.png`, `.jpg` or `.webp`."""
    quality: int | None = None
    """JPEG and WebP outputs' quality, 1-100; None: `icdcli.io.images.DEFAULT_QUALITY`."""


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
    blend_keep: str = SOURCE_BRANCH,
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
        blend_keep=blend_keep,
    )


# --- --from OUTPUT.png: a recorded edit again ----------------------------------------------------------------


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
    given, named = flags.request, flags.given
    sampler = given.sampler if "sampler" in named else record.get("sampler", "icd")
    ddim_steps = given.ddim_steps
    if sampler == "ddim" and "ddim_steps" not in named and record.get("sampler") == "ddim":
        ddim_steps = _recorded_number(record, "steps", "ddim_steps") or given.ddim_steps
    recorded_p2p = record.get("p2p")
    p2p = given.p2p
    if isinstance(recorded_p2p, dict) and not named.intersection(_P2P_FLAGS):
        p2p = P2POptions.from_record(recorded_p2p)
    request = EditRequest(
        method=given.method if "method" in named else record.get("method", "swap"),
        guidance=given.guidance if "guidance" in named else _recorded_number(record, "guidance"),
        tau=given.tau if "tau" in named else _recorded_number(record, "tau"),
        seed=given.seed if "seed" in named else int(check_number("seed", record["seed"])),
        sampler=sampler,
        ddim_steps=ddim_steps,
        p2p=p2p,
    )
    source = flags.source if "source" in named else record["src"]
    target = flags.target if "target" in named else record["tgt"]
    return source, target, request


def _recorded_unguided(record: dict[str, Any], flags: EditFlags) -> str | None:
    if "unguided_prompt" in flags.given:
        return flags.unguided
    value = record.get(UNGUIDED_FIELD, "source")
    if value not in ("source", "target"):
        raise ValueError(f"{UNGUIDED_FIELD} is {value!r}, not source or target")
    return str(value)


def apply_record(
    path: Path, images: tuple[Path, ...], *, flags: EditFlags, model_opts: dict[str, Any]
) -> tuple[tuple[Path, ...], EditFlags, str | None]:
    """The inputs and settings of `icd edit --from OUTPUT.png`: the record's, except where flags are given (a model
    recorded, unless a model flag is given, becomes `model_opts["model"]`); and the recorded model's hash."""
    from icdcli.io.images import read_record
    from icdcli.models.sources import DEFAULT_MODEL, PRESETS
    from icdcli.run.batch import display
    from icdcli.run.records import EXIF_FIELD, QUALITY_FIELD

    if not path.exists():
        raise ICDError(f"--from {display(path)}: no such file; give an image written by icd edit")
    if not path.is_file():
        raise ICDError(f"--from {display(path)} is a folder; give an image written by icd edit")
    record = read_record(path)
    if record is None or not {"src", "tgt", "seed"} <= record.keys():
        raise ICDError(f"--from {display(path)}: no icd edit record in it; give an image written by icd edit (its "
                       "PNG, JPEG or WebP output)")  # fmt: skip
    try:
        source, target, request = _recorded_request(record, flags)
        unguided = _recorded_unguided(record, flags)
    except (NumberError, TypeError, ValueError, AttributeError) as error:
        raise ICDError(f"--from {display(path)}: its record is not usable ({error}); give the flags") from None
    expected_hash = None
    if not flags.given.intersection(MODEL_FLAGS):
        model = str(record.get("model", DEFAULT_MODEL))
        if model not in PRESETS and model != DEFAULT_MODEL and not Path(model).is_dir():
            raise ICDError(
                f"--from {display(path)}: its model {model!r} is not a preset or a folder here; "
                "give --model (or --base/--base-config/--teacher/--forward-lora/--reverse-lora)"
            )
        model_opts["model"] = None if model == DEFAULT_MODEL else model
        expected_hash = record.get("model_hash")
    if not images:
        if record.get("input") == "-":
            raise ICDError(f"--from {display(path)}: its input came on stdin; give the IMAGE file to edit")
        recorded = recorded_path(path, str(record.get("input", "")))
        if not recorded.is_file():
            raise ICDError(
                f"--from {display(path)}: its input {display(recorded)} is not there; give the IMAGE to edit"
            )
        images = (recorded,)
    mask = flags.mask if "mask" in flags.given else _recorded_mask(path, record)
    keep_exif = flags.keep_exif if "keep_exif" in flags.given else record.get(EXIF_FIELD) is True
    quality = flags.quality
    if "quality" not in flags.given and record.get(QUALITY_FIELD) is not None:
        try:
            quality = int(check_number("quality", record[QUALITY_FIELD]))
        except NumberError as error:
            raise ICDError(f"--from {display(path)}: its record is not usable ({error}); give --quality") from None
    edit = EditFlags(source, target, request, unguided, flags.given, mask, keep_exif, flags.suffix, quality)
    return images, edit, expected_hash


def _recorded_mask(path: Path, record: dict[str, Any]) -> Path | None:
    """The mask file a recorded edit was held to (None: it had none), which must still be there."""
    from icdcli.run.batch import display

    if not isinstance(record.get(MASK_FIELD), str):
        return None
    if record[MASK_FIELD] == UPLOADED_MASK:
        raise ICDError(f"--from {display(path)}: its mask was uploaded to icd serve, not a file; give it with --mask")
    mask = recorded_path(path, record[MASK_FIELD])
    if not mask.is_file():
        raise ICDError(f"--from {display(path)}: its mask {display(mask)} is not there; give --mask (or the mask "
                       "file back)")  # fmt: skip
    return mask


# --- files, folders and spec rows ----------------------------------------------------------------------------


def is_icd_output(path: Path) -> bool:
    """Whether `path` is an output of icd edit (a file of a format that carries a record, holding an edit's)."""
    from icdcli.io.images import OUTPUT_SUFFIXES, read_record

    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        return False
    record = read_record(path)
    return record is not None and "method" in record and "src" in record


def collect_items(
    images: list[Path],
    *,
    spec: Path | None,
    recursive: bool,
    flags: EditFlags,
    notify: Callable[[str], None] = log_line,
    targets: Sequence[str] = (),
) -> tuple[list, bool]:
    """The items to edit (folder outputs of icd itself are left out) and whether this is a batch.

    With several `targets` (several --tgt), each image is edited once per target. Raises SpecError (a spec that
    cannot be read) and ICDError (nothing found); `notify` hears of repeats made once.
    """
    from icdcli.run.batch import expand_inputs, read_spec

    outputs: list[Path] = []

    def left_out(path: Path) -> bool:
        if is_icd_output(path):
            outputs.append(path)
            return True
        return False

    items, any_folder = expand_inputs(images, recursive=recursive, skip=left_out)
    if spec is not None:
        items += read_spec(spec)
    items = _drop_repeats(edits_of(items, flags, targets), notify)
    if not items and outputs:
        found, them = ("the image file found is an output", "it") if len(outputs) == 1 else (
            f"the {len(outputs)} image files found are outputs", "them")  # fmt: skip
        raise ICDError(f"nothing to edit: {found} of icd, which folders leave out; name {them} as IMAGE to edit "
                       f"{them} again")  # fmt: skip
    if not items:
        raise ICDError("no images found: folders are searched for image files (-r descends)")
    return items, any_folder or spec is not None or len(items) > 1 or len(targets) > 1


def edits_of(items: list, flags: EditFlags, targets: Sequence[str] = ()) -> list:
    """The items with the command line's prompts and mask where they give none; with several `targets`, each item
    once per target."""
    from icdcli.run.batch import per_target, with_mask, with_prompts

    if len(targets) > 1:
        items = per_target(items, targets)
    return [with_mask(with_prompts(item, flags.source, flags.target), flags.mask) for item in items]


def _drop_repeats(items: list, notify: Callable[[str], None]) -> list:
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
                    item.replace_tail, item.mask)  # fmt: skip
        if identity in seen:
            notify(f"note: {item.label} is the same edit as {seen[identity].label}: made once")
            continue
        seen[identity] = item
        kept.append(item)
    return kept
