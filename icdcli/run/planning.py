"""Where every output of icd goes: one module for `icd edit` (files, folders, spec rows, `--jobs`), `icd invert`
and `icd bench throughput`.

The rules:
- `-o` names a file only for a single input, when it is not an existing folder and does not end in a path
  separator; otherwise it is a folder, created when its parent exists. An input is never an output.
- Edits go to `<stem>-edit.png` (`<stem>-edit-N.png` for the Nth of several --tgt) beside the input, or under
  the `-o` folder mirroring the input's path relative to the folder it was found in; they are deterministic (a
  rerun finds them, `icdcli.run.batch.decide` skips or refuses them). Items whose default names clash are
  renamed; any other clash fails the items involved.
- Other commands' default names (`plan_files`) never land on an input or on a file icd did not make: they take
  the next free name instead.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError, ICDUsageError
from icdcli.io.images import OUTPUT_SUFFIXES
from icdcli.run.batch import IMAGE_SUFFIXES, Item, display

FILE_SUFFIXES = IMAGE_SUFFIXES | {".safetensors"}
"""Suffixes of what icd writes or reads as files: an -o ending in one, where a folder is wanted, is a mistake."""

OUTPUT_FORMATS = ("png", "jpg", "webp")
"""The formats of the outputs icd names (`--format`): each carries the edit's record (`icdcli.io.images`)."""


def check_writable_folder(folder: Path) -> None:
    """The folder an output goes to exists, is a folder and can be written (ICDError saying which not)."""
    if folder.exists() and not folder.is_dir():
        raise ICDError(f"output folder {folder} is a file, not a folder: choose another -o")
    if not folder.is_dir():
        raise ICDError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ICDError(f"output folder {folder} is not writable: choose another with -o")


def _same_file(path: Path, inputs: list[Path]) -> bool:
    where = os.path.realpath(path)
    return any(where == os.path.realpath(other) for other in inputs)


def output_target(
    output: str, inputs: list[Path], *, single: bool, flag: str = "-o", create: bool = True
) -> tuple[Path, bool]:
    """Where `-o OUTPUT` points for `inputs`: (the path, True) for a file, (a folder that exists, False).

    A file only for a `single` input, when OUTPUT is not a folder and does not end in a separator; a missing
    folder named like a file (`edited.png`) is refused unless it ends in a separator, and is otherwise created
    when its parent exists (not with `create` False: a dry run's plan, which only checks that it
    could be). One-line errors for an output that is an input or cannot be made.
    """
    target = Path(output)
    if single and not target.is_dir() and not output.endswith(("/", os.sep)):
        check_writable_folder(target.parent)
        if _same_file(target, inputs):  # a usage error (exit 2): the command line itself asks for it
            raise ICDUsageError(
                f"{flag} {display(target)} is one of the inputs: choose another name, inputs are never replaced"
            )
        return target, True
    if not target.exists() and not output.endswith(("/", os.sep)) and target.suffix.lower() in FILE_SUFFIXES:
        raise ICDUsageError(
            f"{flag} {output} names a file, but there are several outputs (a folder, several inputs or targets): "
            f"give a folder ({flag} {target.with_suffix('')}/; a trailing / makes any name a folder)"
        )
    if not target.exists():
        if target.parent.exists() and not target.parent.is_dir():
            raise ICDError(f"output folder {display(target)} cannot be made: {display(target.parent)} is a file")
        if not target.parent.is_dir():
            raise ICDError(f"output folder {display(target)} does not exist and neither does its parent")
        if not create:
            return target, False
        try:
            target.mkdir(exist_ok=True)  # shards may race to create it
        except OSError as error:
            raise ICDError(
                f"output folder {display(target)} cannot be created ({error.strerror or error}); choose another -o"
            ) from None
    check_writable_folder(target)
    return target, False


def plan_edit_outputs(
    items: list[Item],
    output: str | None,
    *,
    spec: Path | None,
    batch: bool,
    anywhere: bool = False,
    suffix: str = ".png",
    create: bool = True,
) -> list[Item]:
    """Every item of `icd edit` with its output decided (`output_target` for -o, then `plan_items`).

    Args:
        items: The edits, from the command line or a spec.
        output: The -o value (a file, or a folder ending in a separator); None: next to each input.
        spec: The spec file the items came from, if any (its rows' outputs resolve against its folder).
        batch: Whether several images may come (then -o names a folder).
        anywhere: Allow outputs outside the input's or spec's folder.
        suffix: The default outputs' suffix (`--format`): `.png`, `.jpg` or `.webp`.
        create: Make a missing -o folder (False: a dry run's plan).
    """
    spec_folder = spec.parent if spec is not None else None
    if output is None:
        return plan_items(items, None, spec_out=spec_folder, anywhere=anywhere, suffix=suffix)
    inputs = [path for item in items[:1] for path in (item.image, item.mask) if path is not None]
    target, is_file = output_target(output, inputs, single=not batch, create=create)
    if is_file:  # -o: the user's own path
        return plan_items([replace(items[0], output=target)], None, spec_out=spec_folder, anywhere=True)
    return plan_items(items, target, spec_out=spec_folder, anywhere=anywhere, suffix=suffix)


def _made_by_icd(path: Path) -> bool:
    from icdcli.run.outputs import existing_record

    return existing_record(path) is not None


def unique_path(path: Path, taken: set[Path]) -> Path:
    """`path`, or `stem-1`, `stem-2`, ... : the first that is neither `taken` (real paths) nor present."""
    candidate, counter = path, 1
    while Path(os.path.realpath(candidate)) in taken or os.path.lexists(candidate):
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


def plan_files(inputs: list[Path], output: str | None, *, suffix: str, flag: str = "-o") -> list[Path]:
    """Where each input's result goes (`icd invert`: its latents, its reconstruction): `output_target` for the
    option `flag`, else `<stem><suffix>` beside each input; a default name never lands on an input or a file icd
    did not make."""
    if output is not None:
        target, is_file = output_target(output, inputs, single=len(inputs) == 1, flag=flag)
        if is_file:
            return [target]
    taken = {Path(os.path.realpath(path)) for path in inputs}
    planned = []
    for path in inputs:
        folder = Path(output) if output is not None else path.parent
        check_writable_folder(folder)
        chosen = folder / f"{path.stem}{suffix}"
        if Path(os.path.realpath(chosen)) in taken or (os.path.lexists(chosen) and not _made_by_icd(chosen)):
            chosen = unique_path(chosen, taken)
        taken.add(Path(os.path.realpath(chosen)))
        planned.append(chosen)
    return planned


def edit_name(stem: str, variant: int | None, suffix: str = ".png") -> str:
    """`<stem>-edit.png`, or for the Nth of several targets `<stem>-edit-N.png` (`suffix`: another format's)."""
    return f"{stem}-edit{suffix}" if variant is None else f"{stem}-edit-{variant}{suffix}"


def default_output(item: Item, folder: Path | None, suffix: str = ".png") -> Path:
    """`<stem>-edit.png` (`edit_name`) beside the input, or under `folder` at the input's relative path."""
    assert item.image is not None
    name = edit_name(item.image.stem, item.variant, suffix)
    if folder is None:
        return item.image.parent / name
    relative = item.relative or Path(item.image.name)
    return folder / relative.parent / name


def _identity(path: Path) -> str:
    return display(Path(os.path.abspath(path)))


def escapes(output: Path, base: Path | None = None) -> bool:
    """Whether a spec row's `output` would leave the folder `base` it is relative to: absolute, through `..`, or
    (with `base`) through a symbolic link inside it that points outside (paths are resolved before they are
    compared)."""
    if output.is_absolute() or ".." in output.parts or output.anchor != "":
        return True
    if base is None:
        return False
    inside = os.path.realpath(base)
    where = os.path.realpath(base / output)
    return os.path.commonpath([inside, where]) != inside


def plan_items(
    items: list[Item],
    folder: Path | None,
    *,
    spec_out: Path | None = None,
    anywhere: bool = False,
    suffix: str = ".png",
) -> list[Item]:
    """Every usable item with its output path decided.

    A spec row's own `output` resolves against `folder` (-o) when given, else `spec_out` (the
    spec's folder). When several items would write the same default name, spec rows (one image,
    many edits) add their row number (`photo-edit-3.png`) and files their extension
    (`photo-jpg-edit.png`, `photo-png-edit.png`). Any other clash, or an output that is an input,
    fails the items involved.
    """
    inputs = {_identity(path) for item in items for path in (item.image, item.mask) if path is not None}  # masks too
    planned: list[Item] = []
    for item in items:
        if item.error is not None:
            planned.append(item)
        elif (
            item.output is not None
            and not anywhere
            and escapes(item.output, folder if folder is not None else (spec_out or Path(".")))
        ):
            planned.append(
                replace(
                    item,
                    error=f"{item.label}: its output {display(item.output)} leaves the output folder; give a path "
                    "inside it, or pass --any-output to allow this",
                )
            )
        elif item.output is not None:
            base = folder if folder is not None else (spec_out or Path("."))
            planned.append(replace(item, output=item.output if item.output.is_absolute() else base / item.output))
        else:
            planned.append(replace(item, output=default_output(item, folder, suffix)))
    planned = _rename_clashes(planned, items)
    seen: dict[str, Item] = {}
    checked: list[Item] = []
    for item in planned:
        if item.error is None:
            output = planned_output(item)
            identity = _identity(output)
            if identity in inputs:
                item = replace(item, error=f"{item.label}: its output {display(output)} is an input; choose another -o")
            elif output.suffix.lower() not in OUTPUT_SUFFIXES:
                folder_hint = "; a folder ends in /" if not output.suffix else ""
                item = replace(item, error=f"{item.label}: {display(output)}: unsupported output type; use one of "
                                           f"{', '.join(sorted(OUTPUT_SUFFIXES))}{folder_hint}")  # fmt: skip
            elif output.is_dir():
                item = replace(item, error=f"{item.label}: its output {display(output)} is a folder; choose another "
                                           "-o")  # fmt: skip
            elif identity in seen:
                item = replace(
                    item,
                    error=f"{item.label}: {display(output)} is also the output of {seen[identity].label}; "
                    "give the rows their own output, or edit them into different -o folders",
                )
            else:
                seen[identity] = item
        checked.append(item)
    return checked


def planned_output(item: Item) -> Path:
    """The output of an item `plan_items` has planned (every item without an error has one)."""
    assert item.output is not None, f"{item.label}: no output planned"
    return item.output


def _rename_clashes(planned: list[Item], original: list[Item]) -> list[Item]:
    """Default outputs that several items would share: spec rows add their row number, files their extension."""
    counts: dict[str, int] = {}
    for item in planned:
        if item.error is None:
            identity = _identity(planned_output(item))
            counts[identity] = counts.get(identity, 0) + 1
    renamed = []
    for item, before in zip(planned, original, strict=True):
        output = planned_output(item) if item.error is None else None
        if output is not None and before.output is None and counts[_identity(output)] > 1:
            if item.row is not None:
                name = f"{output.stem}-{item.row}{output.suffix}"
            else:
                image = item.image or output
                name = edit_name(f"{image.stem}-{image.suffix.lstrip('.').lower() or 'file'}", item.variant,
                                 output.suffix)  # fmt: skip
            item = replace(item, output=output.with_name(name))
        renamed.append(item)
    return renamed


def dry_run(items: list[Item], *, overwrite: bool = False) -> list[dict[str, Any]]:
    """What `icd edit --dry-run` says of each planned item, without a model: its input and output and whether the
    output exists (`planned`), or why it cannot run (`failed`: its row's or plan's error, an input or mask that is
    not a usable image, read from its header, an existing output icd did not make, without `overwrite`)."""
    from icdcli.io.images import format_problem, probe_image
    from icdcli.run.outputs import existing_record

    records: list[dict[str, Any]] = []
    for item in items:
        where = {"input": None if item.image is None else str(item.image),
                 "output": None if item.output is None else str(item.output), "item": item.label}  # fmt: skip
        error = item.error
        for path, what in ((item.image, ""), (item.mask, "mask ")):
            if error is not None or path is None:
                continue
            try:
                size = probe_image(path)
            except ICDError as problem:
                error = f"{what}{problem}"
            except OSError as problem:
                error = f"{what}{display(path)}: cannot be read ({problem.strerror or problem})"
            else:
                unwritable = format_problem(size, item.output) if path == item.image and item.output else None
                if unwritable is not None and item.output is not None:
                    error = f"{display(item.output)}: {unwritable}"
        exists = error is None and item.output is not None and os.path.lexists(item.output)
        if exists and not overwrite and item.output is not None and existing_record(item.output) is None:
            error = (f"{item.label}: {display(item.output)} exists and was not made by icd edit; pass --overwrite "
                     "to replace it, or choose another -o")  # fmt: skip
        if error is not None:
            records.append({"status": "failed", **where, "error": error})
        else:
            records.append({"status": "planned", **where, "src": item.src, "tgt": item.tgt, "exists": exists})
    return records
