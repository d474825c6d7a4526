"""Quality checks of trained models on held-out scenes, measurable because the scenes are synthetic.

    classify_image(image) -> (shape, colour, background)
    vae_heldout_psnr(vae_dir, count=256, seed=0) -> float
    teacher_sample_accuracy(pipeline_dir, count=64, guidance=4.0, steps=50, seed=0) -> dict
    icd_quality(guidance_dir, consistency_dir, count=64, guidance=4.0, seed=0) -> dict

`python -m icdcli.training.evaluate RUN_DIR` runs every check that the run's folders allow and
prints the results as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding, UNetDenoiser
from icdcli.diffusion.sampler import ddim_invert, ddim_sample, icd_decode, icd_encode
from icdcli.diffusion.schedule import NoiseSchedule
from icdcli.training.common import PromptCache, setup_torch
from icdcli.training.scenes import COLOURS, change_mask, edit_scene, render_batch, scenes, split_rng, to_uint8
from icdcli.training.teacher import load_teacher, load_vae, psnr, vae_psnr

_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb.astype(np.float32)) ** 2).sum(axis=1)))]


def classify_image(image: np.ndarray, threshold: float = 80.0) -> tuple[str, str, str]:
    """Read (shape, colour, background) off a uint8 HxWx3 scene image.

    The background is the border's median colour; the shape is the set of pixels far from it,
    named by how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2).
    """
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.sqrt(((pixels - background) ** 2).sum(-1)) > threshold
    if mask.sum() < 4:
        return "none", "none", nearest_colour(background)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return shape, nearest_colour(np.median(pixels[mask], axis=0)), nearest_colour(background)


def vae_heldout_psnr(vae_dir: str | Path, *, count: int = 256, seed: int = 0) -> float:
    vae = load_vae(vae_dir)
    images, _ = render_batch(scenes("heldout", count, seed=seed), vae.config.sample_size)
    return vae_psnr(vae, images)


@torch.no_grad()
def _decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / vae.config.scaling_factor).sample


@torch.no_grad()
def _encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def _conditioning(prompts: PromptCache, captions: list[str]) -> Conditioning:
    return Conditioning(PromptEmbedding(prompts(captions)), negative=PromptEmbedding(prompts([""] * len(captions))))


def _latent_shape(pipeline: Any, count: int) -> tuple[int, int, int, int]:
    vae = pipeline.vae.config
    side = vae.sample_size // 2 ** (len(vae.block_out_channels) - 1)
    return count, pipeline.unet.config.in_channels, side, side


def _hits(found: list[tuple[str, str, str]], wanted: list[tuple[str, str, str]]) -> dict[str, float]:
    pairs = list(zip(found, wanted, strict=True))
    return {
        "shape": float(np.mean([f[0] == w[0] for f, w in pairs])),
        "colour": float(np.mean([f[1] == w[1] for f, w in pairs])),
        "background": float(np.mean([f[2] == w[2] for f, w in pairs])),
        "all": float(np.mean([f == w for f, w in pairs])),
    }


def teacher_sample_accuracy(
    pipeline_dir: str | Path, *, count: int = 64, guidance: float = 4.0, steps: int = 50, seed: int = 0
) -> dict[str, float]:
    """DDIM samples for held-out captions: how often shape, colour and background come out right."""
    setup_torch()
    pipeline = load_teacher(pipeline_dir)
    targets = scenes("heldout", count, seed=seed)
    prompts = PromptCache(pipeline.tokenizer, pipeline.text_encoder)
    noise = torch.randn(_latent_shape(pipeline, count), generator=torch.Generator().manual_seed(seed))
    cond = _conditioning(prompts, [s.caption() for s in targets])
    x0 = ddim_sample(UNetDenoiser(pipeline.unet), noise, cond, steps, NoiseSchedule.stable_diffusion(), guidance)
    found = [classify_image(image) for image in to_uint8(_decode(pipeline.vae, x0))]
    return _hits(found, [(s.shape, s.colour, s.background) for s in targets])


def icd_quality(
    guidance_dir: str | Path, consistency_dir: str | Path, *, count: int = 64, guidance: float = 4.0, seed: int = 0
) -> dict[str, float]:
    """Inversion and colour edits with the trained forward/reverse adapters on held-out scenes.

    Reconstruction: encode with the forward model, decode unguided with the reverse model; PSNR
    against the image, beside the VAE's own reconstruction (the ceiling) and the guidance-distilled
    teacher's DDIM50 inversion + DDIM50 sampling at w = 1 (the baseline). Edit: decode under
    a caption with another shape colour (prompt swap, dynamic guidance), then check the colour
    came out right and the unchanged pixels stayed (PSNR outside the change mask).
    """
    from icdcli.training.consistency import load_adapter
    from icdcli.training.guidance import load_guided_unet

    setup_torch()
    meta = json.loads((Path(consistency_dir) / "icd_lora.json").read_text())
    forward_b, reverse_b, tau = tuple(meta["forward_boundaries"]), tuple(meta["reverse_boundaries"]), meta["tau"]
    pipeline = load_teacher(guidance_dir)
    teacher = load_guided_unet(guidance_dir)
    forward = UNetDenoiser(load_adapter(teacher, Path(consistency_dir) / meta["forward"]).merge_and_unload())
    reverse = UNetDenoiser(load_adapter(teacher, Path(consistency_dir) / meta["reverse"]).merge_and_unload())
    prompts = PromptCache(pipeline.tokenizer, pipeline.text_encoder)
    schedule = NoiseSchedule.stable_diffusion()

    sources = scenes("heldout", count, seed=seed)
    images, captions = render_batch(sources, pipeline.vae.config.sample_size)
    x0 = _encode(pipeline.vae, images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond = _conditioning(prompts, captions)
    inverted = icd_encode(forward, x0, cond, forward_b, noise, schedule)
    reconstruction = _decode(pipeline.vae, icd_decode(reverse, inverted, cond, reverse_b, 1.0, tau, schedule))
    ceiling = _decode(pipeline.vae, x0)
    baseline = UNetDenoiser(teacher)
    ddim_noise = ddim_invert(baseline, x0, cond, 50, schedule)
    ddim = _decode(pipeline.vae, ddim_sample(baseline, ddim_noise, cond, 50, schedule))

    targets = [edit_scene(s, "colour", split_rng("heldout", i, seed=seed + 1)) for i, s in enumerate(sources)]
    target_cond = _conditioning(prompts, [t.caption() for t in targets])
    edited = icd_decode(reverse, inverted, target_cond, reverse_b, guidance, tau, schedule, unguided_cond=cond)
    edited_images = _decode(pipeline.vae, edited)
    found = [classify_image(image) for image in to_uint8(edited_images)]
    size = images.shape[-1]
    kept = torch.from_numpy(np.stack([~change_mask(s, t, size=size) for s, t in zip(sources, targets, strict=True)]))
    kept_error = (((edited_images - images) ** 2).mean(1) * kept).flatten(1).sum(1) / kept.flatten(1).sum(1)
    return {
        "reconstruction_psnr_db": float(psnr(reconstruction, images).mean()),
        "vae_ceiling_psnr_db": float(psnr(ceiling, images).mean()),
        "ddim50_reconstruction_psnr_db": float(psnr(ddim, images).mean()),
        "edit_colour_accuracy": _hits(found, [(t.shape, t.colour, t.background) for t in targets])["colour"],
        "edit_unchanged_psnr_db": float((10 * torch.log10(4.0 / kept_error.clamp_min(1e-10))).mean()),
    }


def evaluate_run(run_dir: str | Path, count: int = 64) -> dict[str, Any]:
    run = Path(run_dir)
    results: dict[str, Any] = {}
    if (run / "vae" / "config.json").exists():
        results["vae_heldout_psnr_db"] = vae_heldout_psnr(run / "vae", count=4 * count)
    if (run / "teacher" / "model_index.json").exists():
        results["teacher_samples_w4"] = teacher_sample_accuracy(run / "teacher", count=count)
    if (run / "guidance" / "model_index.json").exists():
        results["guidance_distilled_samples_w4"] = teacher_sample_accuracy(run / "guidance", count=count)
    if (run / "consistency" / "icd_lora.json").exists():
        results["icd"] = icd_quality(run / "guidance", run / "consistency", count=count)
    return results


if __name__ == "__main__":
    import sys

    print(json.dumps(evaluate_run(sys.argv[1]), indent=2))
