"""Benchmarks on held-out procedural scenes: inversion quality (the paper's Table 2, at small
scale) and editing against rendered ground truth.

`bench_inversion` encodes each scene with a method's forward process and decodes it back with
the same caption, then compares with the original image. `bench_shapes_edit` edits each scene to
a copy with one attribute changed and compares with that copy rendered exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icdcli.editing import SamplerSettings, decode, decode_p2p, invert_latents
from icdcli.metrics import mse, psnr, ssim
from icdcli.models import ICDModel
from icdcli.p2p import P2PSettings
from icdcli.recipe import P2POptions

from .scenes import COLOURS, EDIT_KINDS, SHAPES, Scene, change_mask, edit_scene, render_batch, scenes, split_rng

HELDOUT = "heldout"
GUIDED_W = 8.0


@dataclass(frozen=True)
class InversionConfig:
    """One row of the inversion table: which model decodes, how, and with what guidance."""

    name: str
    variant: str  # "teacher" for DDIM on the teacher, else a model variant name
    steps: int  # DDIM steps, or the variant's own number of steps
    guidance: float
    dynamic: bool


INVERSION_CONFIGS: tuple[InversionConfig, ...] = (
    InversionConfig("ddim50", "teacher", 50, 1.0, False),
    InversionConfig("cd2", "cd2", 2, 1.0, False),
    InversionConfig("cd3", "cd3", 3, 1.0, False),
    InversionConfig("cd4", "cd4", 4, 1.0, False),
    InversionConfig("cd4+lf", "cd4+lf", 4, 1.0, False),
    InversionConfig("cd4+lf+lr", "cd4+lf+lr", 4, 1.0, False),
    InversionConfig("ddim50-w8", "teacher", 50, GUIDED_W, False),
    InversionConfig("ddim50-w8-dcfg", "teacher", 50, GUIDED_W, True),
    InversionConfig("cd4-w8", "cd4", 4, GUIDED_W, False),
    InversionConfig("cd4-w8-dcfg", "cd4", 4, GUIDED_W, True),
    InversionConfig("cd4+lf-w8-dcfg", "cd4+lf", 4, GUIDED_W, True),
    InversionConfig("cd4+lf+lr-w8-dcfg", "cd4+lf+lr", 4, GUIDED_W, True),
)
MAIN_VARIANT = "cd4+lf+lr"


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).double()


def roundtrip(
    model: ICDModel,
    pixels: torch.Tensor,
    captions: list[str],
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    target_captions: list[str] | None = None,
) -> torch.Tensor:
    """Invert a batch with its captions and decode it (under `target_captions` if given: a prompt-swap edit)."""
    size = (pixels.shape[-1], pixels.shape[-2])
    with torch.no_grad():
        x0 = model.encode_image(pixels)
        latents = invert_latents(model, x0, captions, size, settings)
        unguided = captions if target_captions is not None else None
        return decode(model, latents, target_captions or captions, size, guidance, tau, settings, unguided)


def p2p_roundtrip(
    model: ICDModel,
    pixels: torch.Tensor,
    captions: list[str],
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    target_captions: list[str],
    p2p: P2PSettings,
) -> torch.Tensor:
    """Invert a batch with its captions, then Prompt-to-Prompt edit each image to its target caption."""
    size = (pixels.shape[-1], pixels.shape[-2])
    with torch.no_grad():
        latents = invert_latents(model, model.encode_image(pixels), captions, size, settings)
        return torch.cat(
            [
                decode_p2p(model, latents[i : i + 1], source, target, size, guidance, tau, settings, p2p)
                for i, (source, target) in enumerate(zip(captions, target_captions, strict=True))
            ]
        )


def heldout_scenes(count: int, seed: int = 0) -> list[Scene]:
    return scenes(HELDOUT, count, seed)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_inversion(
    variants: dict[str, ICDModel],
    teacher_model: ICDModel | None,
    count: int = 200,
    batch: int = 50,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    lpips: Any = None,
) -> dict[str, Any]:
    """Reconstruction MSE/PSNR/SSIM of each config whose model is present; absent ones are listed as skipped.

    `lpips` (a network from `icdcli.pie.load_lpips`) adds an `lpips` column.
    """
    say = progress or (lambda message: None)
    anchor = teacher_model or next(iter(variants.values()))
    size = anchor.info.native_size
    items = heldout_scenes(count, seed)
    rows, skipped = [], []
    for config in INVERSION_CONFIGS:
        model = teacher_model if config.variant == "teacher" else variants.get(config.variant)
        if model is None:
            skipped.append(config.name)
            continue
        say(f"inversion: {config.name}")
        sampler = "ddim" if config.variant == "teacher" else "icd"
        settings = SamplerSettings(sampler, config.steps, seed)
        tau = model.info.tau if config.dynamic else 1.0
        scores: dict[str, list[torch.Tensor]] = {"mse": [], "psnr": [], "ssim": []}
        if lpips is not None:
            scores["lpips"] = []
        for chunk in _batches(items, batch):
            pixels, captions = render_batch(chunk, size)
            recon = to_unit(roundtrip(model, pixels, captions, settings, config.guidance, tau))
            original = to_unit(pixels)
            scores["mse"].append(mse(recon, original))
            scores["psnr"].append(psnr(recon, original))
            scores["ssim"].append(ssim(recon, original))
            if lpips is not None:
                from icdcli.pie.networks import lpips_distance

                scores["lpips"].append(lpips_distance(lpips, recon.float() * 2 - 1, original.float() * 2 - 1).double())
        rows.append({"config": config.name, **{k: float(torch.cat(v).mean()) for k, v in scores.items()}})
    return {"n_images": len(items), "rows": rows, "skipped": skipped}


# --- editing against ground truth ----------------------------------------------------------------

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


@dataclass(frozen=True)
class EditMethod:
    name: str
    sampler: str
    guidance: float | None  # None: the model's own edit guidance
    tau: float | None  # None: the model's own tau
    editing: str = "swap"  # or "p2p" (Prompt-to-Prompt with the model's recipe)


EDIT_METHODS: tuple[EditMethod, ...] = (
    EditMethod("icd4-swap", "icd", None, None),
    EditMethod("ddim50-swap", "ddim", GUIDED_W, 1.0),
    EditMethod("icd4-p2p", "icd", None, None, "p2p"),
    EditMethod("ddim50-p2p", "ddim", GUIDED_W, 1.0, "p2p"),
)


def edit_pairs(count: int, seed: int = 0) -> list[tuple[Scene, Scene, str]]:
    """(source, target, kind) for each held-out scene and each kind of edit."""
    pairs = []
    for index, scene in enumerate(heldout_scenes(count, seed)):
        for kind in EDIT_KINDS:
            pairs.append((scene, edit_scene(scene, kind, split_rng(HELDOUT, 10_000 + index, seed)), kind))
    return pairs


def bench_shapes_edit(
    model: ICDModel,
    count: int = 200,
    batch: int = 50,
    seed: int = 0,
    methods: tuple[EditMethod, ...] = EDIT_METHODS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """PSNR to the target, PSNR of the unchanged region to the source, and attribute accuracy, per kind."""
    say = progress or (lambda message: None)
    size = model.info.native_size
    pairs = edit_pairs(count, seed)
    rows, skipped = [], []
    for method in methods:
        if method.sampler == "ddim" and model.teacher_unet is None:
            skipped.append(method.name)
            continue
        say(f"shapes-edit: {method.name}")
        guidance = model.info.edit_guidance if method.guidance is None else method.guidance
        tau = model.info.tau if method.tau is None else method.tau
        settings = SamplerSettings(method.sampler, 50, seed)
        p2p = P2POptions().resolve(model.info.edit)  # the model's recipe, as icd edit uses it
        per_kind: dict[str, dict[str, list[float]]] = {}
        for chunk in _batches(pairs, batch):
            pixels, captions = render_batch([source for source, _, _ in chunk], size)
            targets = [target.caption() for _, target, _ in chunk]
            if method.editing == "p2p":
                edited = p2p_roundtrip(model, pixels, captions, settings, guidance, tau, targets, p2p)
            else:
                edited = roundtrip(model, pixels, captions, settings, guidance, tau, targets)
            edited = to_unit(edited)
            for index, (source, target, kind) in enumerate(chunk):
                image = edited[index : index + 1]
                target_pixels = torch.from_numpy(target.render(size)).permute(2, 0, 1)[None].double() / 255
                source_pixels = torch.from_numpy(source.render(size)).permute(2, 0, 1)[None].double() / 255
                keep = torch.from_numpy(~change_mask(source, target, size))[None, None]
                as_uint8 = (image[0].permute(1, 2, 0).numpy() * 255).round()
                scores = per_kind.setdefault(kind, {"psnr_target": [], "psnr_background": [], "accuracy": []})
                scores["psnr_target"].append(float(psnr(image, target_pixels)))
                scores["psnr_background"].append(float(psnr(image, source_pixels, keep)))
                scores["accuracy"].append(float(classify(as_uint8, target, kind) == getattr(target, ATTRIBUTE[kind])))
        everything: dict[str, list[float]] = {"psnr_target": [], "psnr_background": [], "accuracy": []}
        for kind in EDIT_KINDS:
            scores = per_kind.get(kind)
            if not scores:
                continue
            rows.append({"method": method.name, "kind": kind, **{k: float(np.mean(v)) for k, v in scores.items()}})
            for key, values in scores.items():
                everything[key].extend(values)
        rows.append({"method": method.name, "kind": "all", **{k: float(np.mean(v)) for k, v in everything.items()}})
    return {"n_images": count, "rows": rows, "skipped": skipped}


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a Markdown table; floats with three decimals (PSNR in dB, accuracy as a fraction)."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def load_variants(folder: str | Path | None, loader: Callable[[Path], ICDModel]) -> dict[str, ICDModel]:
    """Model variants for the inversion table: subfolders of `folder` named like the configs (cd2, cd4+lf, ...)."""
    variants: dict[str, ICDModel] = {}
    if folder is None:
        return variants
    for config in INVERSION_CONFIGS:
        path = Path(folder) / config.variant
        if config.variant != "teacher" and config.variant not in variants and (path / "icd.json").is_file():
            variants[config.variant] = loader(path)
    return variants
