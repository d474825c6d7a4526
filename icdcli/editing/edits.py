"""Edits in batches of one working size: each image inverted under its source prompt and decoded under its target,
by prompt swap or Prompt-to-Prompt."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, Denoiser
from icdcli.diffusion.p2p.plan import P2PBatch, P2PPlan, make_plan
from icdcli.diffusion.p2p.tokens import prompt_words
from icdcli.diffusion.recipe import REFINE, P2PError, P2PSettings, SamplerSettings
from icdcli.diffusion.sampler import StepCallback, p2p_decode, p2p_pairs
from icdcli.diffusion.schedule import NoiseSchedule
from icdcli.editing.region import RegionKeeper, latent_mask, paste_outside
from icdcli.editing.reuse import InversionCache, inverted_rows
from icdcli.editing.stages import (
    PromptTable,
    Timings,
    decode_rows,
    encode_prompts,
    same_or_rows,
    stage_done,
    trajectory_row,
    working_size,
)
from icdcli.io.images import tensors_to_images
from icdcli.models.api import EditModel

UNGUIDED_PROMPTS = ("source", "target")
"""Which prompt the unguided steps of a prompt swap use (the release's `amplify_prompt`): the source preserves
more (icd's default), the target edits more."""


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
    unguided: str = "source"
    """Prompt swap: the prompt of the unguided steps, "source" (preserves more) or "target" (edits more)."""
    mask: Image.Image | None = None
    """The region that may change: white where it may, black where the photo stays (`icdcli.editing.region`), at
    the image's size; None: the whole image."""


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
    unguided: str = "source",
    mask: Image.Image | None = None,
) -> Image.Image:
    """Edit `image` from the source prompt to the target prompt: invert with the source prompt, then decode.

    Without `p2p`, prompt swap: decode with the target prompt, the unguided steps (t > tau * 1000)
    keeping the source prompt, which holds the layout in place. With `p2p`, Prompt-to-Prompt: decode
    source and target branches together, the target's attention taken from the source's (see
    `icdcli.diffusion.p2p`). One edit is a batch of one (`edit_batch`).

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
        unguided: Prompt swap: the prompt of the unguided steps, "source" or "target".
        mask: The region that may change (white; black stays the photo's), at the image's size; None: all of it.
    """
    job = EditJob(image, source_prompt, target_prompt, guidance, tau, settings.seed, p2p, unguided, mask)
    result = edit_batch(model, [job], settings=settings, timings=timings)[0]
    if isinstance(result, Exception):
        raise result
    return result


def edit_batch(
    model: EditModel,
    jobs: list[EditJob],
    *,
    settings: SamplerSettings,
    timings: Timings | None = None,
    callback: StepCallback | None = None,
    inversions: InversionCache | None = None,
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
        callback: Called after each decode step with the latents (a P2P decode's: source and target rows
            interleaved); changing them in place changes the steps after.
        inversions: Inversions of earlier batches to reuse, where this batch's new ones are kept
            (`icdcli.editing.reuse`); jobs of one batch that share a photo, source and seed share one inversion
            in any case.
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
                plans.append(p2p_plan(model, job, size, settings))
            except P2PError as error:
                results[index] = error
                plans.append(None)
    runnable = [index for index, result in enumerate(results) if result is None]
    if runnable:
        chosen = [jobs[index] for index in runnable]
        with timings.stage("encode"):
            sources = encode_prompts(model, [job.source for job in chosen], size)
            masked = any(job.mask is not None for job in chosen)
            latents, trajectory = inverted_rows(
                model, [job.image for job in chosen], [job.source for job in chosen], [job.seed for job in chosen],
                size, settings, sources, trajectory=keeps_inversion(chosen) or masked, cache=inversions,
            )  # fmt: skip
            prompts = target_prompts(model, chosen, size, sources)
        with timings.stage("decode"):
            p2p = jobs[0].p2p is not None
            if masked:
                assert trajectory is not None
                callback = region_keeper(chosen, trajectory, tuple(latents.shape[-2:]), p2p=p2p, then=callback)
            if p2p:
                plan = planned(plans, runnable)
                cond = pair_conditioning(prompts, chosen)
                decoded = decode_p2p_rows(
                    model, latents, chosen, plan, size, settings, callback, cond=cond, trajectory=trajectory
                )
            else:
                decoded = decode_swap_rows(model, latents, chosen, settings, prompts, callback)
            # a job whose result is not finite gets its error; the others are kept
            images = tensors_to_images(decoded, [jobs[index].image.size for index in runnable])
            for index, image in zip(runnable, images, strict=True):
                mask = jobs[index].mask
                results[index] = (
                    image
                    if mask is None or isinstance(image, Exception)
                    else paste_outside(jobs[index].image, image, mask)
                )
    return results  # type: ignore[return-value]


def region_keeper(
    jobs: list[EditJob],
    trajectory: dict[int, torch.Tensor],
    latent_hw: tuple[int, ...],
    *,
    p2p: bool,
    then: StepCallback | None,
) -> RegionKeeper:
    """The decode's step callback that holds each masked job's latents outside its mask on its inversion's."""
    masks = [None if job.mask is None else latent_mask(job.mask, (latent_hw[0], latent_hw[1])) for job in jobs]
    rows = [trajectory_row(trajectory, row) for row in range(len(jobs))]
    return RegionKeeper(masks, rows, stride=2 if p2p else 1, offset=1 if p2p else 0, then=then)


def keeps_inversion(jobs: list[EditJob]) -> bool:
    """Whether a job's local blend keeps the inversion's latents (its inversion must record them)."""
    return any(job.p2p is not None and job.p2p.keeps_inversion for job in jobs)


def target_prompts(model: EditModel, jobs: list[EditJob], size: tuple[int, int], sources: PromptTable) -> PromptTable:
    """The sources' table with the jobs' targets not among them, encoded in one call (and the negative prompt
    when a guided step needs one)."""
    guided = any(model.needs_negative(job.guidance) for job in jobs)
    return encode_prompts(model, [job.target for job in jobs], size, with_negative=guided, known=sources)


def pair_conditioning(prompts: PromptTable, jobs: list[EditJob]) -> Conditioning:
    """P2P's rows: (source, target) of each job, interleaved."""
    return prompts.conditioning([prompt for job in jobs for prompt in (job.source, job.target)])


def edit_conditioning(model: EditModel, jobs: list[EditJob], size: tuple[int, int]) -> PromptTable:
    """Every prompt of the jobs encoded once, as an edit encodes them: the sources in one call, new targets in
    another."""
    return target_prompts(model, jobs, size, encode_prompts(model, [job.source for job in jobs], size))


def decode_swap_rows(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    settings: SamplerSettings,
    prompts: PromptTable,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    for job in jobs:
        if job.unguided not in UNGUIDED_PROMPTS:
            raise ValueError(f"the unguided prompt is one of {', '.join(UNGUIDED_PROMPTS)}, got {job.unguided!r}")
    cond = prompts.conditioning([job.target for job in jobs])
    unguided = prompts.conditioning([job.source if job.unguided == "source" else job.target for job in jobs])
    guidance = same_or_rows([job.guidance for job in jobs])
    tau = same_or_rows([job.tau for job in jobs])
    return decode_rows(model, latents, cond, unguided, guidance, tau, settings, callback)


def planned(plans: list[P2PPlan | None], runnable: list[int]) -> list[P2PPlan]:
    chosen = [plans[index] for index in runnable]
    assert all(plan is not None for plan in chosen), "a job that runs has its plan"
    return [plan for plan in chosen if plan is not None]


def p2p_plan(model: EditModel, job: EditJob, size: tuple[int, int], settings: SamplerSettings) -> P2PPlan:
    assert job.p2p is not None, "a Prompt-to-Prompt plan is made for P2P jobs only"
    steps = len(p2p_steps(model, settings))
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


def p2p_steps(model: EditModel, settings: SamplerSettings) -> list[tuple[int, int]]:
    return p2p_pairs(None if settings.sampler == "ddim" else model.info.reverse_boundaries, settings.ddim_steps)


def controlled_denoiser(denoiser: Denoiser) -> ControlledDenoiser:
    """`denoiser`, made ready for attention control (its processors installed: the caller's step, done here)."""
    if not isinstance(denoiser, ControlledDenoiser):
        raise TypeError(f"{type(denoiser).__name__} cannot run Prompt-to-Prompt attention control")
    denoiser.install_control()
    return denoiser


def decode_p2p_rows(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    plans: list[P2PPlan],
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
    cond: Conditioning | None = None,
    trajectory: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Target-branch pixels (P, 3, H, W) of P P2P edits decoded together (source and target rows interleaved);
    `cond`: the rows' prompts, when the caller has encoded them; `trajectory`: the inversion's latents (P rows) at
    each timestep it landed on (`invert_rows`), which the edits whose local blend keeps the inversion need."""
    if keeps_inversion(jobs):
        if trajectory is None:
            raise P2PError(
                "local blend keeping the inversion (blend_keep inversion) needs the latents of the inversion's "
                "steps: edit the image itself, or keep the source branch (--blend-keep source)"
            )
        landings = [s for _, s in p2p_steps(model, settings)]
        for row, (job, each) in enumerate(zip(jobs, plans, strict=True)):
            if job.p2p is not None and job.p2p.keeps_inversion:
                each.keep_inversion(trajectory_row(trajectory, row), landings)
    denoiser = controlled_denoiser(model.teacher_denoiser if settings.sampler == "ddim" else model.reverse_denoiser)
    if cond is None:
        cond = pair_conditioning(edit_conditioning(model, jobs, size), jobs)
    plan = plans[0] if len(plans) == 1 else P2PBatch(plans)
    guidance = same_or_rows([job.guidance for job in jobs])
    tau = same_or_rows([job.tau for job in jobs])
    schedule = NoiseSchedule.stable_diffusion()
    both = p2p_decode(denoiser, latents, cond, p2p_steps(model, settings), guidance, tau, schedule, plan, callback)
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
    trajectory: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode one image's noise latents as a P2P edit; returns the target branch's pixels (1, 3, H, W).

    `callback` sees both branches' latents, (source, target), after each step; `trajectory` holds the inversion's
    latents at its timesteps (`invert_latents`), which local blend keeping the inversion needs."""
    if latents.shape[0] != 1:
        raise ValueError(f"decode_p2p decodes one image; edit_batch decodes several, got a batch of {latents.shape[0]}")
    job = EditJob(Image.new("RGB", size), source_prompt, target_prompt, guidance, tau, settings.seed, p2p)
    pixels, _ = decode_p2p_jobs(
        model, latents, [job], size=size, settings=settings, callback=callback, trajectory=trajectory
    )
    return pixels


def decode_p2p_jobs(
    model: EditModel,
    latents: torch.Tensor,
    jobs: list[EditJob],
    *,
    size: tuple[int, int],
    settings: SamplerSettings,
    callback: StepCallback | None = None,
    trajectory: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[P2PPlan]]:
    """Decode the noise latents (P, C, h, w) of P P2P edits together, as `edit_batch` does: the target branches'
    pixels (P, 3, H, W) and each edit's plan, whose `map_sum` holds the maps local blend read (when it is on).
    The jobs' images are not read; they share guidance and tau. `trajectory`: as `decode_p2p_rows` takes it."""
    plans = [p2p_plan(model, job, size, settings) for job in jobs]
    return decode_p2p_rows(model, latents, jobs, plans, size, settings, callback, trajectory=trajectory), plans
