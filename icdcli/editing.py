"""Inversion, reconstruction, prompt-swap editing and generation on a loaded model.

These functions tie the model (text, VAE, denoisers) to the pure samplers. Prompt-to-Prompt
editing (`edit(..., p2p=...)`) passes its attention control through the denoiser's `control` argument.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image

from .denoiser import Conditioning
from .images import fit_size, image_to_tensor, tensor_to_image
from .models import ICDModel
from .p2p import REFINE, P2PSettings, make_plan, prompt_words
from .sampler import StepCallback, ddim_invert, ddim_sample, icd_decode, icd_encode, p2p_decode, p2p_pairs
from .schedule import NoiseSchedule

SAMPLERS = ("icd", "ddim")
METHODS = ("swap", "p2p")
DEFAULT_SEED = 0


@dataclass
class Timings:
    """Seconds per stage, accumulated."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class SamplerSettings:
    """How to invert and decode: the iCD models, or the DDIM baseline on the teacher."""

    sampler: str = "icd"
    ddim_steps: int = 50
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")


@dataclass
class Inversion:
    """The result of inverting an image: its noise latents and what they were made with."""

    latents: torch.Tensor
    prompt: str
    size: tuple[int, int]
    original_size: tuple[int, int]
    settings: SamplerSettings


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator, so a seed means the same noise on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def working_size(model: ICDModel, image: Image.Image) -> tuple[int, int]:
    return fit_size(image.width, image.height, model.info.native_size, model.info.size_multiple)


def _conditioning(model: ICDModel, prompt: str | list[str], size: tuple[int, int], guidance: float) -> Conditioning:
    width, height = size
    return model.conditioning(prompt, height, width, with_negative=model.needs_negative(guidance))


def invert_latents(
    model: ICDModel,
    x0: torch.Tensor,
    prompt: str | list[str],
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Clean latents (a batch, one prompt each or one for all) -> the noise latents that decode back to them."""
    cond = _conditioning(model, prompt, size, 1.0)
    schedule = NoiseSchedule.stable_diffusion()
    if settings.sampler == "ddim":
        return ddim_invert(model.teacher_denoiser, x0, cond, settings.ddim_steps, schedule, callback=callback)
    noise = seeded_noise(tuple(x0.shape), settings.seed).to(x0.device)
    return icd_encode(model.forward_denoiser, x0, cond, model.info.forward_boundaries, noise, schedule, callback)


def invert(
    model: ICDModel,
    image: Image.Image,
    prompt: str,
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> Inversion:
    """Encode an image into the noise latents that decode back to it under `prompt`."""
    size = working_size(model, image)
    x0 = model.encode_image(image_to_tensor(image, size))
    latents = invert_latents(model, x0, prompt, size, settings, callback)
    return Inversion(latents, prompt, size, image.size, settings)


def decode(
    model: ICDModel,
    latents: torch.Tensor,
    prompt: str | list[str],
    size: tuple[int, int],
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    unguided_prompt: str | list[str] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode noise latents to pixels under `prompt`; steps above tau use `unguided_prompt` if given."""
    cond = _conditioning(model, prompt, size, guidance)
    unguided = None if unguided_prompt is None else _conditioning(model, unguided_prompt, size, 1.0)
    schedule = NoiseSchedule.stable_diffusion()
    if settings.sampler == "ddim":
        x0 = ddim_sample(
            model.teacher_denoiser, latents, cond, settings.ddim_steps, schedule, guidance, tau, unguided, callback
        )
    else:
        x0 = icd_decode(
            model.reverse_denoiser,
            latents,
            cond,
            model.info.reverse_boundaries,
            guidance,
            tau,
            schedule,
            unguided,
            callback,
        )
    return model.decode_latents(x0)


def edit(
    model: ICDModel,
    image: Image.Image,
    source_prompt: str,
    target_prompt: str,
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    timings: Timings | None = None,
    p2p: P2PSettings | None = None,
) -> Image.Image:
    """Edit `image` from the source prompt to the target prompt: invert with the source prompt, then decode.

    Without `p2p`, prompt swap: decode with the target prompt, the unguided steps (t > tau * 1000)
    keeping the source prompt, which holds the layout in place. With `p2p`, Prompt-to-Prompt: decode
    source and target branches together, the target's attention taken from the source's (see
    `icdcli.p2p`).
    """
    timings = timings or Timings()
    with timings.stage("encode"):
        inversion = invert(model, image, source_prompt, settings)
    with timings.stage("decode"):
        if p2p is not None:
            pixels = decode_p2p(
                model, inversion.latents, source_prompt, target_prompt, inversion.size, guidance, tau, settings, p2p
            )
        else:
            pixels = decode(
                model,
                inversion.latents,
                target_prompt,
                inversion.size,
                guidance,
                tau,
                settings,
                unguided_prompt=source_prompt,
            )
        return tensor_to_image(pixels, image.size)


def decode_p2p(
    model: ICDModel,
    latents: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    size: tuple[int, int],
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    p2p: P2PSettings,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode one image's noise latents as a P2P edit; returns the target branch's pixels (1, 3, H, W)."""
    if latents.shape[0] != 1:
        raise ValueError(f"P2P decodes one image at a time, got a batch of {latents.shape[0]}")
    pairs = p2p_pairs(None if settings.sampler == "ddim" else model.info.reverse_boundaries, settings.ddim_steps)
    denoiser = model.teacher_denoiser if settings.sampler == "ddim" else model.reverse_denoiser
    plan = make_plan(model.tokenizers[0], source_prompt, target_prompt, p2p, len(pairs), latents.shape[-1])
    if plan.mode == REFINE and p2p.mode == "auto":
        logging.getLogger("icd").info(
            "the prompts have %d and %d words, so P2P cannot replace word for word: it refines instead "
            "(aligns their tokens; words new in the target keep their own attention)",
            len(prompt_words(source_prompt)),
            len(prompt_words(target_prompt)),
        )
    cond = _conditioning(model, [source_prompt, target_prompt], size, guidance)
    both = p2p_decode(denoiser, latents, cond, pairs, guidance, tau, NoiseSchedule.stable_diffusion(), plan, callback)
    return model.decode_latents(both[1:])


def generate(
    model: ICDModel,
    prompt: str,
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Text-to-image from seeded noise in the reverse model's steps (or DDIM on the teacher)."""
    width, height = size or (model.info.native_size, model.info.native_size)
    factor = model.vae_scale_factor
    noise = seeded_noise((1, model.latent_channels, height // factor, width // factor), settings.seed).to(model.device)
    return tensor_to_image(decode(model, noise, prompt, (width, height), guidance, tau, settings))
