"""Inversion, reconstruction, prompt-swap editing and generation on a loaded model.

These functions tie the model (text, VAE, denoisers) to the pure samplers. Prompt-to-Prompt
editing (`edit(..., p2p=...)`) runs the model's denoiser under attention control (`ControlledDenoiser`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .denoiser import Conditioning, ControlledDenoiser, Denoiser, PromptEmbedding
from .images import fit_size, image_to_tensor, tensor_to_image, tensors_to_images
from .model_api import EditModel
from .p2p import REFINE, P2PBatch, P2PError, P2PPlan, P2PSettings, make_plan, prompt_words
from .recipe import SamplerSettings
from .sampler import StepCallback, ddim_invert, ddim_sample, icd_decode, icd_encode, p2p_decode, p2p_pairs
from .schedule import NoiseSchedule


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


def working_size(model: EditModel, image: Image.Image) -> tuple[int, int]:
    return fit_size(image.width, image.height, native_size=model.info.native_size, multiple=model.info.size_multiple)


def stage_done(model: EditModel, role: str) -> None:
    """The `role` UNet's stage of an edit is over: a low-memory model frees its weights now (see icdcli.memory)."""
    if model.low_memory:
        model.release(role)


def _conditioning(model: EditModel, prompt: str | list[str], size: tuple[int, int], guidance: float) -> Conditioning:
    width, height = size
    return model.conditioning(prompt, height, width, with_negative=model.needs_negative(guidance))


def invert_latents(
    model: EditModel,
    x0: torch.Tensor,
    prompt: str | list[str],
    *,
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
    latents = icd_encode(model.forward_denoiser, x0, cond, model.info.forward_boundaries, noise, schedule, callback)
    stage_done(model, "forward")
    return latents


def invert(
    model: EditModel,
    image: Image.Image,
    prompt: str,
    *,
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> Inversion:
    """Encode an image into the noise latents that decode back to it under `prompt`.

    Args:
        model: The model (PyTorch or accelerated) whose forward steps (or DDIM teacher) invert.
        image: The RGB photo; it is resized to the model's working size.
        prompt: The prompt the inversion is conditioned on (the edit's source prompt).
        settings: The sampler, its DDIM steps and the seed of the forward noise.
        callback: Called after each step with its latents.
    """
    size = working_size(model, image)
    x0 = model.encode_image(image_to_tensor(image, size))
    latents = invert_latents(model, x0, prompt, size=size, settings=settings, callback=callback)
    return Inversion(latents, prompt, size, image.size, settings)


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
    cond = _conditioning(model, prompt, size, guidance)
    unguided = None if unguided_prompt is None else _conditioning(model, unguided_prompt, size, 1.0)
    return _decode_latents(model, latents, cond, unguided, guidance, tau, settings, callback)


@dataclass(frozen=True)
class EditJob:
    """One edit of a batch: its image, prompts and its own guidance, tau, seed and P2P settings (None: swap)."""

    image: Image.Image
    source: str
    target: str
    guidance: float
    tau: float
    seed: int
    p2p: P2PSettings | None = None


def edit(
    model: EditModel,
    image: Image.Image,
    source_prompt: str,
    target_prompt: str,
    *,
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
    `icdcli.p2p`). One edit is a batch of one (`edit_batch`).

    Args:
        model: The model (PyTorch or accelerated).
        image: The RGB photo to edit; the result has its size.
        source_prompt: What the photo shows.
        target_prompt: What the edited photo should show.
        guidance: The classifier-free guidance scale of the decode.
        tau: Decode steps with t > tau * 1000 run unguided.
        settings: The sampler, its DDIM steps and the seed.
        timings: Collects the seconds of the encode and decode stages.
        p2p: Prompt-to-Prompt settings; None: prompt swap.
    """
    job = EditJob(image, source_prompt, target_prompt, guidance, tau, settings.seed, p2p)
    result = edit_batch(model, [job], settings=settings, timings=timings)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _same(values: list) -> Any:
    """One value for all rows when they share it (a float keeps a batch of one on the scalar path), else (B,)."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32)


def _prompt_rows(model: EditModel, rows: list[list[str]], size: tuple[int, int], guided: bool) -> list[Conditioning]:
    """Conditioning for each list of prompts, every distinct prompt encoded once, in one batch."""
    unique = list(dict.fromkeys(prompt for prompts in rows for prompt in prompts))
    width, height = size
    both = model.conditioning(unique, height, width, with_negative=guided)
    position = {prompt: index for index, prompt in enumerate(unique)}
    found = []
    for prompts in rows:
        index = torch.tensor([position[prompt] for prompt in prompts], device=both.prompt.hidden_states.device)
        pooled = (
            None
            if both.prompt.pooled is None
            else both.prompt.pooled.index_select(0, index.to(both.prompt.pooled.device))
        )
        found.append(both.with_prompt(PromptEmbedding(both.prompt.hidden_states.index_select(0, index), pooled)))
    return found


def edit_batch(
    model: EditModel,
    jobs: list[EditJob],
    *,
    settings: SamplerSettings,
    timings: Timings | None = None,
) -> list[Image.Image | Exception]:
    """Edit images of one working size together: one network call per step for the whole batch.

    Each job keeps its own prompts, guidance, tau, seed and noise, so its result does not depend on the
    rest of the batch (up to the backend's rounding). The jobs are either all prompt swap or all
    Prompt-to-Prompt. Returns each job's edited image (at its own size), or the error that job alone
    met (P2P settings its prompts cannot use, a non-finite result); `settings.seed` is not used.

    Args:
        model: The model (PyTorch or accelerated).
        jobs: The edits, every image of one working size.
        settings: The sampler and its DDIM steps, shared by the batch.
        timings: Collects the seconds of the encode and decode stages.
    """
    timings = timings or Timings()
    if not jobs:
        return []
    sizes = {working_size(model, job.image) for job in jobs}
    if len(sizes) != 1 or len({job.p2p is None for job in jobs}) != 1:
        raise ValueError("a batch of edits shares one working size and one method (swap or p2p)")
    size = sizes.pop()
    results: list[Image.Image | Exception | None] = [None] * len(jobs)
    plans: list[P2PPlan | None] = []
    if jobs[0].p2p is not None:
        for index, job in enumerate(jobs):
            try:
                plans.append(_p2p_plan(model, job, size, settings))
            except P2PError as error:
                results[index] = error
                plans.append(None)
    runnable = [index for index, result in enumerate(results) if result is None]
    if runnable:
        chosen = [jobs[index] for index in runnable]
        with timings.stage("encode"):
            conds = _edit_conditioning(model, chosen, size)
            pixels = torch.cat([image_to_tensor(job.image, size) for job in chosen])
            x0 = model.encode_image(pixels)
            latents = _invert_rows(model, x0, chosen, settings, conds.source)
        with timings.stage("decode"):
            if jobs[0].p2p is not None:
                plan = _planned(plans, runnable)
                decoded = _decode_p2p_rows(model, latents, chosen, plan, size, settings, cond=conds.pairs)
            else:
                decoded = _decode_swap_rows(model, latents, chosen, settings, conds.target, conds.source)
            # a job whose result is not finite gets its error; the others are kept
            images = tensors_to_images(decoded, [jobs[index].image.size for index in runnable])
            for index, image in zip(runnable, images, strict=True):
                results[index] = image
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class EditConditioning:
    """The prompts of a batch of edits, row by row: sources, targets, and (source, target) pairs interleaved (P2P's
    rows). A negative prompt rides along where a guided step needs one."""

    source: Conditioning
    target: Conditioning
    pairs: Conditioning


def _edit_conditioning(model: EditModel, jobs: list[EditJob], size: tuple[int, int]) -> EditConditioning:
    """Every prompt of the batch encoded once, in one call (the sources serve both the inversion and the decode)."""
    guided = any(model.needs_negative(job.guidance) for job in jobs)
    sources, targets = [job.source for job in jobs], [job.target for job in jobs]
    pairs = [prompt for job in jobs for prompt in (job.source, job.target)]
    return EditConditioning(*_prompt_rows(model, [sources, targets, pairs], size, guided))


def _invert_rows(
    model: EditModel, x0: torch.Tensor, jobs: list[EditJob], settings: SamplerSettings, cond: Conditioning
) -> torch.Tensor:
    schedule = NoiseSchedule.stable_diffusion()
    if settings.sampler == "ddim":
        return ddim_invert(model.teacher_denoiser, x0, cond, settings.ddim_steps, schedule)
    noise = torch.cat([seeded_noise((1, *x0.shape[1:]), job.seed) for job in jobs]).to(x0.device)
    latents = icd_encode(model.forward_denoiser, x0, cond, model.info.forward_boundaries, noise, schedule)
    stage_done(model, "forward")
    return latents


def _decode_swap_rows(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    settings: SamplerSettings,
    cond: Conditioning,
    unguided: Conditioning,
) -> torch.Tensor:
    guidance = _same([job.guidance for job in jobs])
    tau = _same([job.tau for job in jobs])
    return _decode_latents(model, latents, cond, unguided, guidance, tau, settings)


def _decode_latents(
    model: EditModel,
    latents: torch.Tensor,
    cond: Conditioning,
    unguided: Conditioning | None,
    guidance: Any,
    tau: Any,
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    schedule = NoiseSchedule.stable_diffusion()
    if settings.sampler == "ddim":
        x0 = ddim_sample(
            model.teacher_denoiser, latents, cond, settings.ddim_steps, schedule, guidance, tau, unguided, callback
        )
    else:
        boundaries = model.info.reverse_boundaries
        x0 = icd_decode(model.reverse_denoiser, latents, cond, boundaries, guidance, tau, schedule, unguided, callback)
    stage_done(model, "teacher" if settings.sampler == "ddim" else "reverse")
    return model.decode_latents(x0)


def _planned(plans: list[P2PPlan | None], runnable: list[int]) -> list[P2PPlan]:
    chosen = [plans[index] for index in runnable]
    assert all(plan is not None for plan in chosen), "a job that runs has its plan"
    return [plan for plan in chosen if plan is not None]


def _p2p_plan(model: EditModel, job: EditJob, size: tuple[int, int], settings: SamplerSettings) -> P2PPlan:
    assert job.p2p is not None, "a Prompt-to-Prompt plan is made for P2P jobs only"
    steps = len(_p2p_steps(model, settings))
    factor = model.vae_scale_factor
    plan = make_plan(
        model.tokenizers[0], job.source, job.target, settings=job.p2p, num_steps=steps, latent_side=size[0] // factor
    )
    if plan.mode == REFINE and job.p2p.mode == "auto":
        logging.getLogger("icd").info(
            "the prompts have %d and %d words, so P2P cannot replace word for word: it refines instead "
            "(aligns their tokens; words new in the target keep their own attention)",
            len(prompt_words(job.source)),
            len(prompt_words(job.target)),
        )
    return plan


def _p2p_steps(model: EditModel, settings: SamplerSettings) -> list[tuple[int, int]]:
    return p2p_pairs(None if settings.sampler == "ddim" else model.info.reverse_boundaries, settings.ddim_steps)


def controlled_denoiser(denoiser: Denoiser) -> ControlledDenoiser:
    """`denoiser`, made ready for attention control (its processors installed: the caller's step, done here)."""
    if not isinstance(denoiser, ControlledDenoiser):
        raise TypeError(f"{type(denoiser).__name__} cannot run Prompt-to-Prompt attention control")
    denoiser.install_control()
    return denoiser


def _decode_p2p_rows(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    plans: list[P2PPlan],
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """Target-branch pixels (P, 3, H, W) of P P2P edits decoded together (source and target rows interleaved);
    `cond`: the rows' prompts, when the caller has encoded them."""
    denoiser = controlled_denoiser(model.teacher_denoiser if settings.sampler == "ddim" else model.reverse_denoiser)
    if cond is None:
        cond = _edit_conditioning(model, jobs, size).pairs
    plan = plans[0] if len(plans) == 1 else P2PBatch(plans)
    guidance = _same([job.guidance for job in jobs])
    tau = _same([job.tau for job in jobs])
    schedule = NoiseSchedule.stable_diffusion()
    both = p2p_decode(denoiser, latents, cond, _p2p_steps(model, settings), guidance, tau, schedule, plan, callback)
    del denoiser  # it holds the UNet: released below, it must not stay alive through the VAE decode
    stage_done(model, "teacher" if settings.sampler == "ddim" else "reverse")
    return model.decode_latents(both[1::2])


def decode_p2p(
    model: EditModel,
    latents: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    *,
    size: tuple[int, int],
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    p2p: P2PSettings,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode one image's noise latents as a P2P edit; returns the target branch's pixels (1, 3, H, W).

    `callback` sees both branches' latents, (source, target), after each step."""
    if latents.shape[0] != 1:
        raise ValueError(f"decode_p2p decodes one image; edit_batch decodes several, got a batch of {latents.shape[0]}")
    job = EditJob(Image.new("RGB", size), source_prompt, target_prompt, guidance, tau, settings.seed, p2p)
    pixels, _ = decode_p2p_jobs(model, latents, [job], size=size, settings=settings, callback=callback)
    return pixels


def decode_p2p_jobs(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    *,
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, list[P2PPlan]]:
    """Decode the noise latents (P, C, h, w) of P P2P edits together, as `edit_batch` does: the target branches'
    pixels (P, 3, H, W) and each edit's plan, whose `map_sum` holds the maps local blend read (when it is on).
    The jobs' images are not read; they share guidance and tau."""
    plans = [_p2p_plan(model, job, size, settings) for job in jobs]
    return _decode_p2p_rows(model, latents, jobs, plans, size, settings, callback), plans


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
