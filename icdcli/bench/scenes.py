"""What the benchmarks on held-out procedural scenes share: the scenes, a round trip through a model (inversion
and decoding, or a Prompt-to-Prompt edit), the classifier of an edited attribute, and the table writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from icdcli.diffusion.p2p.plan import blend_mask
from icdcli.diffusion.p2p.tokens import word_indicator
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.editing.edits import EditJob, decode_p2p, decode_p2p_jobs
from icdcli.editing.generation import decode, invert_latents
from icdcli.editing.stages import trajectory_row
from icdcli.models.api import EditModel
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
    p2p: P2PSettings | Sequence[P2PSettings],
) -> torch.Tensor:
    """Invert a batch with its captions, then Prompt-to-Prompt edit each image to its target caption
    (under one set of P2P settings for all, or one each)."""
    size = (pixels.shape[-1], pixels.shape[-2])
    per_image = [p2p] * len(captions) if isinstance(p2p, P2PSettings) else list(p2p)
    keeps = any(each.keeps_inversion for each in per_image)
    trajectory: dict[int, torch.Tensor] | None = {} if keeps else None
    with torch.no_grad():
        x0 = model.encode_image(pixels)
        latents = invert_latents(model, x0, captions, size=size, settings=settings, trajectory=trajectory)
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
                    p2p=each,
                    trajectory=None if trajectory is None else trajectory_row(trajectory, i),
                )
                for i, (source, target, each) in enumerate(zip(captions, target_captions, per_image, strict=True))
            ]
        )


def source_attention_maps(
    model: EditModel,
    pixels: torch.Tensor,
    captions: list[str],
    *,
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    p2p: P2PSettings,
) -> tuple[list[torch.Tensor], int]:
    """The cross-attention maps local blend reads, as an edit of each image to its own caption collects them.

    Each image is inverted with its caption and decoded as a P2P edit from that caption to itself, with
    local blend on (so every step records its maps); returns each image's source-branch map, summed over
    the steps and the blend-resolution layers ((Q, L), queries by caption tokens), and the map's side.

    Args:
        model: The model whose reverse steps decode.
        pixels: Images (B, 3, H, W) in [-1, 1].
        captions: Each image's caption.
        settings: The sampler and the seed of the inversion.
        guidance: Guidance of the target branch (the source branch runs unguided).
        tau: Dynamic guidance threshold of the target branch.
        p2p: The edit's P2P settings; its blend words are replaced by each caption's first word.
    """
    size = (pixels.shape[-1], pixels.shape[-2])
    blank = Image.new("RGB", size)
    jobs = [
        EditJob(blank, caption, caption, guidance, tau, settings.seed, replace(p2p, blend=(caption.split()[0],)))
        for caption in captions
    ]
    with torch.no_grad():  # the edit path's own plans and decode, so the maps are exactly local blend's
        latents = invert_latents(model, model.encode_image(pixels), captions, size=size, settings=settings)
        _, plans = decode_p2p_jobs(model, latents, jobs, size=size, settings=settings)
    maps = []
    for plan in plans:
        assert plan.map_sum is not None, "a decode with local blend records its maps"
        maps.append(plan.map_sum[0].cpu())
    return maps, plans[0].blend_size


def word_region(
    tokenizer: Any,
    caption: str,
    word: str,
    source_map: torch.Tensor,
    *,
    side: int,
    image_hw: tuple[int, int],
    threshold: float,
) -> np.ndarray:
    """Where `word`'s map is above `threshold` of its maximum, at the image's size (bool HxW): P2P's local
    blend region of that word (`icdcli.diffusion.p2p.plan.blend_mask`), upsampled to the image instead of the
    latents."""
    tokens = word_indicator(tokenizer, caption, [word])
    mask = blend_mask(source_map[None], tokens[None], size=side, latent_hw=image_hw, threshold=threshold)
    return mask[0, 0].bool().numpy()


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
