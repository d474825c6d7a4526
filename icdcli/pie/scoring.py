"""Scoring a run's outputs as PIE-Bench's evaluation does, and the means per editing type.

- background PSNR, MSE, SSIM and LPIPS: both images multiplied by the unedited mask (1 - mask), then the
  ordinary full-image metric (the zeroed pixels count, with zero error); an item whose mask covers
  everything has none (skipped from the means);
- structure distance and CLIP scores: see `networks`; CLIP on the whole edited image and on the edited
  image multiplied by the mask (the edited region), with the editing prompt.

PSNR, MSE and SSIM always run; the network metrics run when their local weights are given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icdcli.core.errors import ICDError
from icdcli.pie.dataset import EDIT_TYPES, PieItem, decode_mask, output_path, source_path
from icdcli.pie.networks import ClipScore, StructureDistance, load_clip, load_dino, load_lpips, lpips_distance
from icdcli.run.batch import display

METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")


def _unit(image: np.ndarray):
    """uint8 HxWx3 -> float64 tensor (1, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).permute(2, 0, 1)[None]


def background_metrics(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """PSNR, MSE and SSIM of the unedited region: both uint8 images times (1 - mask), then the whole-image metric."""
    from icdcli.bench.metrics import mse, psnr, ssim

    keep = ~np.asarray(mask, dtype=bool)
    if not keep.any():
        return {"psnr": None, "mse": None, "ssim": None}
    weight = _unit(np.repeat(keep[..., None], 3, axis=2).astype(np.uint8) * 255)
    a, b = _unit(source) * weight, _unit(edited) * weight
    return {"psnr": float(psnr(a, b)[0]), "mse": float(mse(a, b)[0]), "ssim": float(ssim(a, b)[0])}


def lpips_background(network, source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float | None:
    """LPIPS of the unedited region: both images times (1 - mask), mapped to [-1, 1], as the benchmark does."""
    import torch

    keep = ~np.asarray(mask, dtype=bool)
    if not keep.any():
        return None
    weight = torch.from_numpy(keep.astype(np.float32))[None, None]
    a = _unit(source).float() * weight * 2 - 1
    b = _unit(edited).float() * weight * 2 - 1
    return float(lpips_distance(network, a, b)[0])


def recorded_seconds(record: Mapping[str, Any] | None) -> float | None:
    """The seconds of the edit (inversion + decoding) an output's record holds, if any."""
    seconds = record.get("seconds") if isinstance(record, Mapping) else None
    value = seconds.get("edit") if isinstance(seconds, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Scorers:
    """The optional network metrics that could be loaded, and why the others are skipped."""

    lpips: Any = None
    dino: StructureDistance | None = None
    clip: ClipScore | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def load_scorers(lpips: Path | None, dino: Path | None, clip: Path | None) -> Scorers:
    """Load what was given; note what was not (PSNR, MSE and SSIM need nothing)."""
    scorers = Scorers()
    if lpips is None:
        scorers.skipped["lpips"] = "no --lpips weights given (the state dict of lpips.LPIPS(net='squeeze'))"
    else:
        scorers.lpips = load_lpips(lpips)
    if dino is None:
        scorers.skipped["structure_distance"] = "no --dino model given (a local copy of facebook/dino-vitb8)"
    else:
        scorers.dino = load_dino(dino)
    if clip is None:
        reason = "no --clip model given (a local copy of openai/clip-vit-large-patch14)"
        scorers.skipped["clip_whole"] = scorers.skipped["clip_edited"] = reason
    else:
        scorers.clip = load_clip(clip)
    return scorers


def _rgb(path: Path) -> np.ndarray:
    from icdcli.io.images import load_image

    return np.asarray(load_image(path), dtype=np.uint8)


def score_item(item: PieItem, root: Path, folder: Path, scorers: Scorers) -> dict[str, Any]:
    """Every metric of one item's output against its source; an `error` instead when it cannot be scored."""
    from icdcli.io.images import read_record

    out = output_path(folder, item)
    row: dict[str, Any] = {"key": item.key, "editing_type_id": item.editing_type_id}
    try:
        source, edited = _rgb(source_path(root, item)), _rgb(out)
    except ICDError as error:
        return {**row, "error": str(error)}
    if source.shape != edited.shape:
        sizes = f"{edited.shape[1]}x{edited.shape[0]}, its source {source.shape[1]}x{source.shape[0]}"
        return {**row, "error": f"{display(out)}: {sizes}; outputs must keep their source's size"}
    mask = decode_mask(item.mask, source.shape[0], source.shape[1])
    row.update(background_metrics(source, edited, mask))
    if scorers.lpips is not None:
        row["lpips"] = lpips_background(scorers.lpips, source, edited, mask)
    if scorers.dino is not None:
        row["structure_distance"] = scorers.dino(source, edited)
    if scorers.clip is not None:
        row["clip_whole"] = scorers.clip(edited, item.target_prompt)
        region = (edited * mask[..., None]).astype(np.uint8)
        row["clip_edited"] = scorers.clip(region, item.target_prompt) if mask.any() else None
    row["seconds_per_edit"] = recorded_seconds(read_record(out))
    return row


def _mean(rows: list[dict[str, Any]], name: str) -> float | None:
    values = [row[name] for row in rows if isinstance(row.get(name), (int, float)) and not math.isnan(row[name])]
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Means per editing type and over everything (items without a value for a metric are left out of it)."""
    scored = [row for row in rows if "error" not in row]
    columns = [*metrics, "seconds_per_edit"]

    def table(group: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(group), **{name: _mean(group, name) for name in columns}}

    per_type = {
        type_id: {"name": EDIT_TYPES[type_id], **table([row for row in scored if row["editing_type_id"] == type_id])}
        for type_id in sorted({row["editing_type_id"] for row in scored})
    }
    return {"overall": table(scored), "per_type": per_type}


def present_metrics(scorers: Scorers) -> list[str]:
    return [name for name in METRICS if name not in scorers.skipped]
