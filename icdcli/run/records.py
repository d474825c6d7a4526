"""The record an edit's output carries (its `icd` text chunk), built in one place for every edit `icd edit` writes:
the batch runner's (`icdcli.run.session`) and the decode of a saved inversion (`icdcli.run.latents`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.run.batch import MATCH_FIELDS, parameter_record
from icdcli.run.outputs import path_from

if TYPE_CHECKING:
    from icdcli.diffusion.recipe import P2PSettings, ResolvedEdit
    from icdcli.run.model import ModelIdentity

UNGUIDED_FIELD = "unguided_prompt"
"""The record field of a swap whose unguided steps use the target prompt (absent: the source, icd's default)."""


MASK_FIELD, MASK_SHA_FIELD = "mask", "mask_sha256"
"""The record fields of an edit held to a mask: its path from the output, and its digest (absent: no mask)."""
UPLOADED_MASK = "(uploaded)"
"""The `mask` of an edit whose mask came with an `icd serve` request, not from a file."""


def mask_record(sha256: str) -> dict[str, str]:
    """What the record of an edit held to an uploaded mask adds: the marker and the digest of its bytes."""
    return {MASK_FIELD: UPLOADED_MASK, MASK_SHA_FIELD: f"sha256:{sha256}"}


QUALITY_FIELD, EXIF_FIELD = "quality", "keep_exif"
"""The record fields of how the file was written: a lossy output's --quality where it is not the format's default,
and --keep-exif (absent: the default quality, no EXIF; so records written before them still match)."""


def match_fields() -> tuple[str, ...]:
    """The fields of an edit's record that decide its file: the batch's, the unguided prompt of a swap, the mask's
    digest, a lossy output's quality and whether it carries the input's EXIF."""
    return (*MATCH_FIELDS, UNGUIDED_FIELD, MASK_SHA_FIELD, QUALITY_FIELD, EXIF_FIELD)


def file_record(output: Path | None, *, quality: int | None, keep_exif: bool = False) -> dict[str, Any]:
    """What a record adds for how its file is written (see `QUALITY_FIELD`)."""
    from icdcli.io.images import DEFAULT_QUALITY, OUTPUT_SUFFIXES

    added: dict[str, Any] = {}
    default = DEFAULT_QUALITY.get(OUTPUT_SUFFIXES.get(output.suffix.lower(), "")) if output is not None else None
    if quality is not None and default is not None and quality != default:
        added[QUALITY_FIELD] = quality
    if keep_exif:
        added[EXIF_FIELD] = True
    return added


def unguided_record(method: str, unguided: str | None) -> dict[str, str]:
    """What a record adds for the unguided prompt: only a swap whose unguided steps take the target."""
    return {UNGUIDED_FIELD: "target"} if method == "swap" and unguided == "target" else {}


def edit_record(
    edit: ResolvedEdit,
    model: ModelIdentity,
    *,
    src: str,
    tgt: str,
    output: Path,
    image: Path,
    input_size: tuple[int, int] | None,
    input_sha256: str,
    p2p: P2PSettings | None = None,
    unguided: str | None = None,
    recorded_input: str | None = None,
    mask: Path | None = None,
    mask_sha256: str | None = None,
    recorded_mask: str | None = None,
) -> dict[str, Any]:
    """The record of `image` edited from `src` to `tgt` into `output` with `edit` on `model`.

    Args:
        p2p: the Prompt-to-Prompt settings of a `p2p` edit (None for a swap).
        unguided: a swap's prompt of the unguided steps (`source` or `target`; None: the source).
        recorded_input: what the record names the input (`-`: it came on stdin); None: its path from the output.
        mask, mask_sha256: the mask file the edit is held to and its digest (None: no mask); recorded_mask: what the
            record names it (None: its path from the output).
    """
    from icdcli.core.version import __version__

    record = parameter_record(
        method=edit.method,
        p2p=None if p2p is None else p2p.to_record(),
        model=model.ref,
        model_hash=model.hash,
        backend=model.backend,
        precision=model.precision,
        sampler=edit.sampling.sampler,
        steps=edit.sampling.steps(model.num_steps),
        src=src,
        tgt=tgt,
        guidance=edit.guidance,
        tau=edit.tau,
        seed=edit.seed,
        version=__version__,
        input_path=recorded_input if recorded_input is not None else path_from(output, image),
        input_size=input_size,
        input_sha256=input_sha256,
    )
    where = recorded_mask if recorded_mask is not None else None if mask is None else path_from(output, mask)
    masked = {} if mask is None else {MASK_FIELD: where, MASK_SHA_FIELD: mask_sha256}
    return {**record, **unguided_record(edit.method, unguided), **masked}
