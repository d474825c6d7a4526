"""What the benchmarks on held-out procedural scenes share: the scenes, a round trip through a model (inversion
and decoding, or a Prompt-to-Prompt edit), the classifier of an edited attribute, and the table writer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from icdcli.editing import SamplerSettings, decode, decode_p2p, invert_latents
from icdcli.model_api import EditModel
from icdcli.p2p import P2PSettings
from icdcli.training.scenes import COLOURS, EDIT_KINDS, SHAPES, Scene, edit_scene, scenes, split_rng

HELDOUT = "heldout"
GUIDED_W = 8.0


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).double()


def roundtrip(
    model: EditModel,
    pixels: torch.Tensor,
    captions: list[str],
    *,
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    target_captions: list[str] | None = None,
) -> torch.Tensor:
    """Invert a batch with its captions and decode it (under `target_captions` if given: a prompt-swap edit)."""
    size = (pixels.shape[-1], pixels.shape[-2])
    with torch.no_grad():
        x0 = model.encode_image(pixels)
        latents = invert_latents(model, x0, captions, size=size, settings=settings)
        unguided = captions if target_captions is not None else None
        return decode(
            model,
            latents,
            target_captions or captions,
            size=size,
            guidance=guidance,
            tau=tau,
            settings=settings,
            unguided_prompt=unguided,
        )


def p2p_roundtrip(
    model: EditModel,
    pixels: torch.Tensor,
    captions: list[str],
    *,
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    target_captions: list[str],
    p2p: P2PSettings,
) -> torch.Tensor:
    """Invert a batch with its captions, then Prompt-to-Prompt edit each image to its target caption."""
    size = (pixels.shape[-1], pixels.shape[-2])
    with torch.no_grad():
        latents = invert_latents(model, model.encode_image(pixels), captions, size=size, settings=settings)
        return torch.cat(
            [
                decode_p2p(
                    model,
                    latents[i : i + 1],
                    source,
                    target,
                    size=size,
                    guidance=guidance,
                    tau=tau,
                    settings=settings,
                    p2p=p2p,
                )
                for i, (source, target) in enumerate(zip(captions, target_captions, strict=True))
            ]
        )


def heldout_scenes(count: int, seed: int = 0) -> list[Scene]:
    return scenes(HELDOUT, count, seed=seed)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


ATTRIBUTE = {"colour": "colour", "shape": "shape", "background": "background"}


def classify(image: np.ndarray, target: Scene, kind: str) -> str:
    """The value of the edited attribute that best explains `image`: render every candidate, take the closest."""
    attribute = ATTRIBUTE[kind]
    values = SHAPES if kind == "shape" else tuple(COLOURS)
    best, best_error = "", float("inf")
    for value in values:
        try:
            candidate = replace(target, **{attribute: value})
        except ValueError:  # shape and background may not share a colour
            continue
        error = float(np.mean((candidate.render(image.shape[0]).astype(np.float64) - image) ** 2))
        if error < best_error:
            best, best_error = value, error
    return best


def edit_pairs(count: int, seed: int = 0) -> list[tuple[Scene, Scene, str]]:
    """(source, target, kind) for each held-out scene and each kind of edit."""
    pairs = []
    for index, scene in enumerate(heldout_scenes(count, seed)):
        for kind in EDIT_KINDS:
            pairs.append((scene, edit_scene(scene, kind, split_rng(HELDOUT, 10_000 + index, seed=seed)), kind))
    return pairs


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a Markdown table; floats with three decimals (PSNR in dB, accuracy as a fraction)."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
