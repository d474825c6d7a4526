"""The outputs of `icd generate` and `icd invert`: their parameter records, the one rule for an existing file,
and the text chunks an output image carries (the command line prints each result: `icdcli.cli.results`).

The rule, shared with `icd edit` (icdcli.run.batch.decide): an existing file is replaced only with --overwrite;
one made by icd with the same parameters is skipped; any other is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.core.errors import ICDError

if TYPE_CHECKING:
    from icdcli.models.checkpoints import ModelFiles

RECORD_KEY = "icd"
GENERATE_FIELDS = ("command", "model_hash", "sampler", "steps", "prompt", "guidance", "tau", "seed", "width", "height")
INVERT_FIELDS = ("command", "model_hash", "sampler", "steps", "prompt", "seed", "input_sha256")
RECONSTRUCT_FIELDS = (*INVERT_FIELDS, "guidance", "tau")
LATENT_FIELDS = (*INVERT_FIELDS, "format")
"""A latent file's deciding fields: an inversion's, and the file format (`icdcli.editing.inversion.INVERSION_FORMAT`),
so a file of an older icd, which an edit cannot use, is not skipped as made already."""


def read_latent_record(path: Path) -> dict[str, Any] | None:
    """The parameter record in a latent file's safetensors metadata; None when there is none."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= 100_000_000:
                return None
            header = json.loads(handle.read(length))
        record = json.loads(header.get("__metadata__", {}).get(RECORD_KEY, ""))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def existing_record(path: Path) -> dict[str, Any] | None:
    from icdcli.io.images import read_record

    if path.suffix.lower() == ".safetensors":
        return read_latent_record(path)
    return read_record(path, RECORD_KEY)


def check_existing(
    path: Path, wanted: dict[str, Any], *, fields: tuple[str, ...], overwrite: bool, flag: str = "-o"
) -> str | None:
    """None: make `path`. A reason: skip it (made with these parameters). ICDError: refused (the message names
    `flag`, the option that chose the path)."""
    import os

    from icdcli.run.batch import decide, display

    exists = os.path.lexists(path)
    if exists and path.is_dir():
        raise ICDError(f"{display(path)} is a folder: give a file name with {flag}")
    existing = existing_record(path) if exists and not overwrite else None
    maker = f"icd {wanted['command'].split('-')[0]}"
    decision = decide(exists, existing, wanted, overwrite=overwrite, fields=fields, maker=maker, flag=flag)
    if decision.action == "refuse":
        raise ICDError(f"{display(path)} {decision.reason}")
    return decision.reason if decision.action == "skip" else None


def path_from(output: Path, path: Path) -> str:
    """`path` as a record keeps it: relative to the output's folder (records stay valid when a tree of
    inputs and outputs moves together), absolute when no relative path leads there."""
    import os

    try:
        return os.path.relpath(Path(path).absolute(), Path(output).absolute().parent)
    except ValueError:  # another drive (Windows)
        return str(Path(path).absolute())


def recorded_path(output: Path, recorded: str) -> Path:
    """Where a path a record keeps points: relative ones are relative to the output's folder."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(output).absolute().parent / path


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def a1111_parameters(record: dict[str, Any], files: ModelFiles | None = None) -> str:
    """The record as the `parameters` text that image browsers read (AUTOMATIC1111's layout): the prompt,
    then `Key: value` pairs. icd has no negative prompt; edits add their source prompt and method.

    `files` (`icdcli.models.checkpoints.model_files`) name the checkpoint and LoRAs by AutoV2 hash, which A1111,
    ComfyUI's readers and civitai resolve; without a checkpoint there is no `Model hash` (icd's own `model_hash`
    stays in the `icd` record, no reader could resolve it)."""
    prompt = str(record.get("tgt") or record.get("prompt") or "")
    size = record.get("input_size") or [record.get("width"), record.get("height")]
    named = files.parameters() if files is not None else {}
    pairs = {
        "Steps": record.get("steps"),
        "Sampler": {"icd": "iCD", "ddim": "DDIM"}.get(str(record.get("sampler")), record.get("sampler")),
        "CFG scale": record.get("guidance"),
        "Seed": record.get("seed"),
        "Size": f"{size[0]}x{size[1]}" if size and all(size) else None,
        "Model hash": named.get("Model hash"),
        "Model": named.get("Model") or (Path(str(record["model"])).name if record.get("model") else None),
        "Source prompt": record.get("src"),
        "Edit method": record.get("method"),
        "Dynamic guidance tau": record.get("tau"),
        "Lora hashes": named.get("Lora hashes"),
    }
    details = ", ".join(f"{key}: {_a1111_value(value)}" for key, value in pairs.items() if value is not None)
    return f"{prompt}\n{details}"


def image_text(record: dict[str, Any], files: ModelFiles | None = None) -> dict[str, str]:
    """The text chunks of an output image: icd's record (`icd`, what reruns compare) and `parameters` (with the
    checkpoint and LoRA hashes of `files`, the model's `icdcli.models.checkpoints.model_files`)."""
    from icdcli.core.values import strict_json

    return {RECORD_KEY: strict_json(record), "parameters": a1111_parameters(record, files)}
