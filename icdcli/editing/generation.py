"""Latents inverted and decoded under one prompt (or one per row), and text-to-image from seeded noise."""

from __future__ import annotations

import torch
from PIL import Image

from icdcli.diffusion.recipe import SamplerSettings
from icdcli.diffusion.sampler import StepCallback, ddim_invert, icd_encode
from icdcli.diffusion.schedule import NoiseSchedule
from icdcli.editing.stages import conditioning_at, decode_rows, recording, seeded_noise, stage_done
from icdcli.io.images import tensor_to_image
from icdcli.models.api import EditModel


def invert_latents(
    model: EditModel,
    x0: torch.Tensor,
    prompt: str | list[str],
    *,
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
    trajectory: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clean latents (a batch, one prompt each or one for all) -> the noise latents that decode back to them;
    `trajectory` (when given) receives the latents of each timestep the inversion lands on (`recording`)."""
    cond = conditioning_at(model, prompt, size, 1.0)
    schedule = NoiseSchedule.stable_diffusion()
    callback = recording(trajectory, x0, callback)
    if settings.sampler == "ddim":
        return ddim_invert(model.teacher_denoiser, x0, cond, settings.ddim_steps, schedule, callback=callback)
    noise = seeded_noise(tuple(x0.shape), settings.seed).to(x0.device)
    latents = icd_encode(model.forward_denoiser, x0, cond, model.info.forward_boundaries, noise, schedule, callback)
    stage_done(model, "forward")
    return latents


def decode(
    model: EditModel,
    latents: torch.Tensor,
    prompt: str | list[str],
    *,
    size: tuple[int, int],
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    unguided_prompt: str | list[str] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode noise latents to pixels under `prompt`; steps above tau use `unguided_prompt` if given.

    Args:
        model: The model whose reverse steps (or DDIM teacher) decode.
        latents: Noise latents (B, C, h, w), e.g. an `Inversion`'s.
        prompt: One prompt for all rows or one per row.
        size: The working size (width, height) in pixels.
        guidance: The classifier-free guidance scale.
        tau: Steps with t > tau * 1000 run unguided.
        settings: The sampler and its DDIM steps.
        unguided_prompt: The prompt of the unguided steps (prompt swap: the source prompt); None: `prompt`.
        callback: Called after each step with its latents.
    """
    cond = conditioning_at(model, prompt, size, guidance)
    unguided = None if unguided_prompt is None else conditioning_at(model, unguided_prompt, size, 1.0)
    return decode_rows(model, latents, cond, unguided, guidance, tau, settings, callback)


def generate(
    model: EditModel,
    prompt: str,
    *,
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Text-to-image from seeded noise in the reverse model's steps (or DDIM on the teacher).

    Args:
        model: The model (PyTorch or accelerated).
        prompt: What the image should show.
        guidance: The classifier-free guidance scale.
        tau: Steps with t > tau * 1000 run unguided.
        settings: The sampler, its DDIM steps and the noise seed.
        size: The image size (width, height); None: the model's native square.
    """
    width, height = size or (model.info.native_size, model.info.native_size)
    factor = model.vae_scale_factor
    noise = seeded_noise((1, model.latent_channels, height // factor, width // factor), settings.seed).to(model.device)
    return tensor_to_image(
        decode(model, noise, prompt, size=(width, height), guidance=guidance, tau=tau, settings=settings)
    )
