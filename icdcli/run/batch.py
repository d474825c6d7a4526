"""Batch editing as pure logic: which items, with what settings, written where, by which shard, and
whether an existing output is already done.

Nothing here loads a model or decodes an image: `icd edit` (in `edit_run.py`) drives these functions.

- Inputs: image paths, folders (image extensions only; `recursive` descends) and spec files
  (`.jsonl` or `.csv`, one edit per row) become `Item`s. A row that cannot be used becomes an item
  with an `error`, so it fails on its own and the others still run.
- Outputs: planned by `icdcli.run.planning` (one module for every command's outputs).
- Shards: an item belongs to shard `sha256(item.key) mod N`; every process of a sharded run
  computes the same split from the same arguments, so N shards cover every item exactly once.
- Resume: each output PNG carries its parameter record (`icd` text chunk); a rerun skips an item
  whose record matches, refuses to replace one that differs unless told to overwrite.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from icdcli.core.texts import LINE_BYTES, TEXTS, TextError, check_text, shown

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".hif"}
)
SPEC_FIELDS = ("image", "src", "tgt", "guidance", "tau", "seed", "output", "blended_word", "replace_tail", "mask")
METHOD = "swap"
# the fields of a record that decide the pixels of an output (backend, precision and version only round)
MATCH_FIELDS = (
    "model_hash", "method", "p2p", "sampler", "steps", "src", "tgt", "guidance", "tau", "seed", "input_sha256"
)  # fmt: skip


class SpecError(ValueError):
    """A spec file that cannot be read at all (rows with problems become failed items instead)."""


@dataclass(frozen=True)
class Item:
    """One edit to make: its input, the settings its row gives, and where its output goes."""

    label: str
    key: str
    image: Path | None = None
    relative: Path | None = None
    src: str | None = None
    tgt: str | None = None
    guidance: float | None = None
    tau: float | None = None
    seed: int | None = None
    output: Path | None = None
    row: int | None = None
    error: str | None = None
    blended_word: str | None = None  # "SOURCE_WORD TARGET_WORD": P2P local blend per prompt, as PIE-Bench writes it
    replace_tail: str | None = (
        None  # P2P replace: aligned or release (icdcli.diffusion.recipe.REPLACE_TAILS); None: the run's
    )
    recorded_input: str | None = None  # what the output's record names the input (`-`: stdin); None: its path
    mask: Path | None = None  # the region that may change (white; icdcli.editing.region); None: the whole image
    recorded_mask: str | None = None  # what the output's record names the mask; None: its path from the output
    variant: int | None = None  # which of several --tgt (1-based): the output is <stem>-edit-<variant>.png


def display(path: str | os.PathLike[str]) -> str:
    """A path as printable UTF-8: bytes that are not UTF-8 (Linux names) appear as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_folder(folder: Path, *, recursive: bool) -> list[Path]:
    """Image files in `folder` (and below it when `recursive`), sorted; hidden files and folders skipped."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found.extend(Path(root) / name for name in files if is_image_name(Path(name)))
    return sorted(found, key=lambda path: os.fsencode(path))


def path_item(path: Path, relative: Path) -> Item:
    """The item of an image file found at `relative` under the folder it was found in."""
    return Item(label=display(path), key=display(path.absolute()), image=path, relative=relative)


def expand_inputs(
    paths: Iterable[Path], *, recursive: bool, skip: Callable[[Path], bool] | None = None
) -> tuple[list[Item], bool]:
    """Items for image paths and folders, and whether any folder was given.

    Files named explicitly are taken whatever their extension (a bad one fails on its own);
    folders contribute their image files, except those `skip` rejects (icd's own outputs).
    """
    items: list[Item] = []
    any_folder = False
    for path in paths:
        if path.is_dir():
            any_folder = True
            for found in list_folder(path, recursive=recursive):
                if skip is None or not skip(found):
                    items.append(path_item(found, found.relative_to(path)))
        else:
            items.append(path_item(path, Path(path.name)))
    return items, any_folder


# --- spec files ------------------------------------------------------------------------------


def _number(value: Any, name: str) -> float | int | None:
    """A row's number checked like the flag of the same name (icdcli.core.values); None when the cell is empty."""
    from icdcli.core.values import check_number

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_number(name, value)


def spec_row(raw: Any, row: int, spec: Path) -> Item:
    """One spec row as an Item; a row that cannot be used becomes an Item with an error."""
    label = f"{display(spec)}:{row}"
    key = f"{display(spec.absolute())}:{row}"
    if not isinstance(raw, Mapping):
        return Item(label, key, row=row, error=f"{label}: a row must be an object with image, src, tgt")
    unknown = sorted(set(raw) - set(SPEC_FIELDS))
    if unknown:
        return Item(
            label,
            key,
            row=row,
            error=f"{label}: unknown field {shown(repr(unknown[0]))}; fields: {', '.join(SPEC_FIELDS)}",
        )
    image = raw.get("image")
    if not isinstance(image, str) or not image.strip():
        return Item(label, key, row=row, error=f"{label}: no image; every row needs an image path")
    given = _given_image(image, spec)  # a failed row still reports the image it names

    def failed(message: str) -> Item:
        return Item(label, key, image=given, row=row, error=f"{label}: {message}")

    for name in ("src", "tgt", "output", "blended_word", "replace_tail", "mask"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            return failed(f"{name} must be text, not {_shown_value(raw[name])}")
    try:
        for name, kind in (("image", "path"), ("output", "path"), ("src", "prompt"), ("tgt", "prompt"),
                           ("blended_word", "word"), ("mask", "path")):  # fmt: skip
            check_text(kind, raw.get(name), name)
        guidance = _number(raw.get("guidance"), "guidance")
        tau = _number(raw.get("tau"), "tau")
        seed_value = _number(raw.get("seed"), "seed")
        replace_tail = _replace_tail(raw.get("replace_tail"))
    except ValueError as error:  # TextError, NumberError
        return failed(str(error))
    image_path = spec.parent / image.strip()
    try:
        relative = image_path.relative_to(spec.parent)
    except ValueError:  # an absolute path elsewhere
        relative = Path(image_path.name)
    if ".." in relative.parts:
        relative = Path(image_path.name)
    output = raw.get("output")
    mask = raw.get("mask")
    return Item(
        label=label,
        key=key,
        image=image_path,
        relative=relative,
        src=raw.get("src") or None,
        tgt=raw.get("tgt") or None,
        guidance=guidance,
        tau=tau,
        seed=None if seed_value is None else int(seed_value),
        output=Path(output.strip()) if output and output.strip() else None,
        row=row,
        blended_word=raw.get("blended_word") or None,
        replace_tail=replace_tail,
        mask=spec.parent / mask.strip() if mask and mask.strip() else None,
    )


def _replace_tail(value: str | None) -> str | None:
    """A row's `replace_tail`, checked (None when the cell is empty: the command line's)."""
    from icdcli.diffusion.recipe import check_replace_tail

    if value is None or not value.strip():
        return None
    return check_replace_tail(value.strip())


def _given_image(image: str, spec: Path) -> Path | None:
    """The image a row names, as its failure reports it (None when it is no usable path at all)."""
    if len(image) > TEXTS["path"].limit or "\x00" in image:
        return None
    return spec.parent / image.strip()


def _shown_value(value: Any) -> str:
    return shown(repr(value), 60)


def _jsonl_rows(text: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if len(line) > LINE_BYTES:
            yield (
                number,
                TextError(
                    f"the row is {len(line):,} characters long; a row may have at most {LINE_BYTES:,} (icd's text "
                    "limits): shorten its prompts"
                ),
            )
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, error


def _csv_rows(text: str, spec: Path) -> Iterable[tuple[int, Any]]:
    reader = csv.DictReader(text.splitlines())
    fields = [name.strip() for name in reader.fieldnames or []]
    unknown = [name for name in fields if name not in SPEC_FIELDS]
    if not fields or unknown or "image" not in fields:
        found = ", ".join(fields) or "none"
        raise SpecError(
            f"{display(spec)}: the first line must name the columns: image, src, tgt and optionally guidance, "
            f"tau, seed, output, blended_word, replace_tail, mask (found: {found})"
        )
    reader.fieldnames = fields
    while True:
        try:
            raw = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # a cell over csv's field limit (128 KiB), a NUL byte ...
            yield reader.line_num, ValueError(f"not a CSV row ({error})")
            continue
        if None in raw:
            yield reader.line_num, ValueError(f"more cells than the {len(fields)} columns")
            continue
        yield reader.line_num, {key: value for key, value in raw.items() if value is not None and value.strip()}


def read_spec(spec: Path) -> list[Item]:
    """The rows of a `.jsonl` or `.csv` spec file; relative image paths resolve against its folder."""
    if spec.suffix.lower() not in (".jsonl", ".csv"):
        raise SpecError(f"--spec {display(spec)}: use a .jsonl or .csv file")
    try:
        text = spec.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SpecError(f"--spec {display(spec)}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"--spec {display(spec)}: is a folder; give a .jsonl or .csv file") from None
    except OSError as error:
        raise SpecError(f"--spec {display(spec)}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError(f"--spec {display(spec)}: not UTF-8 text; save it as UTF-8") from None
    rows = _jsonl_rows(text) if spec.suffix.lower() == ".jsonl" else _csv_rows(text, spec)
    items = []
    for number, raw in rows:
        if isinstance(raw, Exception):
            label = f"{display(spec)}:{number}"
            items.append(Item(label, f"{display(spec.absolute())}:{number}", row=number, error=f"{label}: {raw}"))
        else:
            items.append(spec_row(raw, number, spec))
    return items


def with_mask(item: Item, mask: Path | None) -> Item:
    """The item with the command line's mask where its row gives none."""
    return item if mask is None or item.mask is not None or item.error is not None else replace(item, mask=mask)


def per_target(items: list[Item], targets: Sequence[str]) -> list[Item]:
    """Each item once per target (several --tgt), a photo's edits side by side: they share its inversion."""
    expanded = []
    for item in items:
        if item.error is not None:
            expanded.append(item)
            continue
        for number, target in enumerate(targets, start=1):
            expanded.append(replace(item, tgt=target, variant=number, label=f"{item.label} (--tgt {number})"))
    return expanded


def with_prompts(item: Item, src: str | None, tgt: str | None) -> Item:
    """The item with the command line's prompts where its row gives none; an error if one is still missing."""
    if item.error is not None:
        return item
    merged = replace(item, src=item.src or src, tgt=item.tgt or tgt)
    for flag, value in (("--src", merged.src), ("--tgt", merged.tgt)):
        if value is None or not value.strip():
            where = f"give {flag[2:]} in the row or {flag}" if item.row is not None else f"give {flag}"
            return replace(merged, error=f"{item.label}: no {flag[2:]} prompt; {where}")
    return merged


# --- shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: shard `index` of `count`; `auto` when a launcher's RANK/WORLD_SIZE gave it."""

    index: int
    count: int
    auto: bool = False


def parse_shard(text: str, *, environ: Mapping[str, str] | None = None) -> Shard:
    """`I/N` (0 <= I < N) as Shard(I, N); `auto` reads RANK and WORLD_SIZE (set by accelerate launch, torchrun)."""
    environ = os.environ if environ is None else environ
    auto = text.strip().lower() == "auto"
    if auto:
        index, count = environ.get("RANK", "0"), environ.get("WORLD_SIZE", "1")
    else:
        index, _, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count), auto)
    except ValueError:
        raise ValueError(f"{text!r}: write I/N with 0 <= I < N, e.g. 0/4, or auto") from None
    if not 0 <= shard.index < shard.count:
        raise ValueError(f"{text!r}: I must be 0..N-1 (shards are numbered from 0), e.g. 0/4")
    return shard


def shard_of(key: str, count: int) -> int:
    """The shard of an item: a stable hash of its identity (the same in every process and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def select_shard(items: list[Item], index: int, count: int) -> list[Item]:
    return [item for item in items if shard_of(item.key, count) == index]


# --- parameter records and resume -----------------------------------------------------------


def parameter_record(
    *,
    model: str,
    model_hash: str,
    backend: str,
    precision: str,
    sampler: str,
    steps: int,
    src: str,
    tgt: str,
    guidance: float,
    tau: float,
    seed: int,
    version: str,
    input_path: str,
    input_size: tuple[int, int] | None,
    input_sha256: str,
    method: str = METHOD,
    p2p: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an output PNG records about how it was made (its `icd` text chunk); `p2p` holds the
    Prompt-to-Prompt settings of a `p2p` edit."""
    return {
        "icd_version": version,
        "model": model,
        "model_hash": model_hash,
        "backend": backend,
        "precision": precision,
        "method": method,
        "p2p": p2p,
        "sampler": sampler,
        "steps": steps,
        "src": src,
        "tgt": tgt,
        "guidance": float(guidance),
        "tau": float(tau),
        "seed": int(seed),
        "input": input_path,
        "input_size": list(input_size) if input_size else None,
        "input_sha256": input_sha256,
    }


def record_differences(
    existing: Mapping[str, Any], wanted: Mapping[str, Any], *, fields: tuple[str, ...] = MATCH_FIELDS
) -> list[str]:
    """The deciding fields on which two records differ ('seed 0 -> 7', ...)."""
    return [
        f"{name} {existing.get(name)!r} -> {wanted.get(name)!r}"
        for name in fields
        if existing.get(name) != wanted.get(name)
    ]


@dataclass(frozen=True)
class Decision:
    """What to do with an item whose output may exist: 'run', 'skip' or 'refuse', and why."""

    action: str
    reason: str = ""


def decide(
    exists: bool,
    existing: Mapping[str, Any] | None,
    wanted: Mapping[str, Any],
    *,
    overwrite: bool,
    fields: tuple[str, ...] = MATCH_FIELDS,
    maker: str = "icd edit",
    flag: str = "-o",
) -> Decision:
    """Run a missing output; skip one made with the same parameters; refuse to replace any other.

    The one rule of every command that writes a file: `fields` are what decide its content, `maker` the
    command whose records carry them."""
    if not exists:
        return Decision("run")
    if overwrite:
        return Decision("run", "replacing the existing output (--overwrite)")
    if existing is None:
        return Decision(
            "refuse", f"exists and was not made by {maker}; pass --overwrite to replace it, or choose another {flag}"
        )
    differences = record_differences(existing, wanted, fields=fields)
    if not differences:
        return Decision("skip", "already made with these parameters")
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    return Decision(
        "refuse", f"exists with other parameters ({shown}); pass --overwrite to replace it, or choose another {flag}"
    )


@dataclass
class Tally:
    """Counts of a batch run, for its summary."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    not_reached: int = 0  # items a stop (Ctrl-C, SIGTERM, a fatal failure) left for the rerun

    def reached(self) -> int:
        return self.done + self.skipped + self.failed

    def summary(self, seconds: float, load_seconds: float) -> dict[str, Any]:
        return {
            "status": "summary",
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_reached": self.not_reached,
            "seconds": round(seconds, 3),
            "load_seconds": round(load_seconds, 3),
            "images_per_second": round(self.done / seconds, 4) if seconds > 0 else 0.0,
        }

    def line(self, seconds: float, interrupted: bool = False) -> str:
        rate = self.done / seconds if seconds > 0 else 0.0
        head = "interrupted: " if interrupted else ""
        left = f", {self.not_reached} not reached" if self.not_reached else ""
        return (
            f"{head}{self.done} done, {self.skipped} skipped, {self.failed} failed{left} in {seconds:.1f} s "
            f"({rate:.2f} images/s)"
        )


def total_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a run split over processes: counts added, the slowest process's seconds."""
    seconds = max((summary["seconds"] for summary in summaries), default=0.0)
    done = sum(summary["done"] for summary in summaries)
    return {
        "status": "total",
        "processes": len(summaries),
        "done": done,
        "skipped": sum(summary["skipped"] for summary in summaries),
        "failed": sum(summary["failed"] for summary in summaries),
        "not_reached": sum(summary.get("not_reached", 0) for summary in summaries),
        "seconds": round(seconds, 3),
        "images_per_second": round(done / seconds, 4) if seconds > 0 else 0.0,
    }


# --- batch sizes ------------------------------------------------------------------------------

# Working pixels per network call by default: on the CPU, 64 images of 32x32 (the embedded model: more
# gained under 1% in `icd bench throughput`); on a GPU, 16 images of 512x512 (SD1.5). Larger images get
# proportionally fewer per batch, never fewer than one.
BATCH_PIXELS = {"cpu": 64 * 32 * 32, "cuda": 16 * 512 * 512}
MAX_BATCH = 64


def default_batch_size(device_type: str, pixels: int) -> int:
    """How many images of `pixels` working pixels are edited per network call on a device of this type."""
    budget = BATCH_PIXELS["cuda" if device_type == "cuda" else "cpu"]
    return max(1, min(MAX_BATCH, budget // max(1, pixels)))
