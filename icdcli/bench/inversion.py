"""Inversion quality on held-out scenes (the paper's Table 2, at small scale): each scene is encoded with a
method's forward process and decoded back with the same caption, then compared with the original image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from icdcli.bench.metrics import mse, psnr, ssim
from icdcli.bench.scenes import GUIDED_W, batches, heldout_scenes, roundtrip, to_unit
from icdcli.diffusion.recipe import SamplerSettings
from icdcli.models.api import EditModel
from icdcli.training.scenes import render_batch


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


def bench_inversion(
    variants: dict[str, EditModel],
    teacher_model: EditModel | None,
    *,
    count: int = 200,
    batch: int = 50,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    lpips: Any = None,
) -> dict[str, Any]:
    """Reconstruction MSE/PSNR/SSIM of each config whose model is present; absent ones are listed as skipped.
    The first row, `vae`, encodes and decodes with the VAE alone: the ceiling of every other row.

    Args:
        variants: Models by config name.
        teacher_model: The model of the teacher rows; None skips them.
        count: Images per config.
        batch: Images per network call.
        seed: Seed of the scenes and the noise.
        progress: Called with a line per config.
        lpips: A network from `icdcli.pie.networks.load_lpips`; adds an `lpips` column.
    """
    say = progress or (lambda message: None)
    anchor = teacher_model or next(iter(variants.values()))
    size = anchor.info.native_size
    items = heldout_scenes(count, seed)
    chunks = [render_batch(chunk, size) for chunk in batches(items, batch)]

    def vae_only(pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return anchor.decode_latents(anchor.encode_image(pixels))

    say("inversion: vae")
    rows = [{"config": "vae", **_scores(vae_only, chunks, lpips)}]
    skipped = []
    for config in INVERSION_CONFIGS:
        model = teacher_model if config.variant == "teacher" else variants.get(config.variant)
        if model is None:
            skipped.append(config.name)
            continue
        say(f"inversion: {config.name}")
        sampler = "ddim" if config.variant == "teacher" else "icd"
        settings = SamplerSettings(sampler, config.steps, seed)
        tau = model.info.tau if config.dynamic else 1.0
        reconstruct = partial(roundtrip, model, settings=settings, guidance=config.guidance, tau=tau)
        rows.append({"config": config.name, **_scores(reconstruct, chunks, lpips)})
    return {"n_images": len(items), "rows": rows, "skipped": skipped}


def _scores(
    reconstruct: Callable[[torch.Tensor, list[str]], torch.Tensor],
    chunks: list[tuple[torch.Tensor, list[str]]],
    lpips: Any,
) -> dict[str, float]:
    """Mean MSE, PSNR, SSIM (and LPIPS with a network) of `reconstruct(pixels, captions)` against the pixels."""
    scores: dict[str, list[torch.Tensor]] = {"mse": [], "psnr": [], "ssim": []}
    if lpips is not None:
        scores["lpips"] = []
    for pixels, captions in chunks:
        recon, original = to_unit(reconstruct(pixels, captions)), to_unit(pixels)
        scores["mse"].append(mse(recon, original))
        scores["psnr"].append(psnr(recon, original))
        scores["ssim"].append(ssim(recon, original))
        if lpips is not None:
            from icdcli.pie.networks import lpips_distance

            scores["lpips"].append(lpips_distance(lpips, recon.float() * 2 - 1, original.float() * 2 - 1).double())
    return {k: float(torch.cat(v).mean()) for k, v in scores.items()}


def load_variants(folder: str | Path | None, loader: Callable[[Path], EditModel]) -> dict[str, EditModel]:
    """Model variants for the inversion table: subfolders of `folder` named like the configs (cd2, cd4+lf, ...)."""
    variants: dict[str, EditModel] = {}
    if folder is None:
        return variants
    for config in INVERSION_CONFIGS:
        path = Path(folder) / config.variant
        if config.variant != "teacher" and config.variant not in variants and (path / "icd.json").is_file():
            variants[config.variant] = loader(path)
    return variants
