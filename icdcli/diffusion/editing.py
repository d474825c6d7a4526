"""Inversion, reconstruction, prompt-swap editing and generation on a loaded model.

These functions tie the model (text, VAE, denoisers) to the pure samplers. Prompt-to-Prompt
editing (`edit(..., p2p=...)`) runs the model's denoiser under attention control (`ControlledDenoiser`).

Invert once, edit many (stable names and signatures; the pipeline class and `icd invert` / `icd edit
--latents` call them):

- `invert_for_edit(model, image, source, settings) -> Inversion`: the inverted latent and what made it (model
  hash, source prompt, seed, working and original size, sampler, boundaries), the source prompt's encoding
  cached with it in memory.
- `edit_inversion(model, inversion, target, *, guidance, tau, settings, p2p=None, unguided="source",
  timings=None) -> Image`:
  the decode alone, under any target, guidance, tau, method (swap, or P2P with `p2p`) and, for swap, the prompt
  of the unguided steps (`unguided`: "source" or "target"). Pixel-identical to `edit` / `edit_batch` with the
  same settings: both encode the sources in one text-encoder call and the new targets in another.
- `check_inversion(model, inversion, settings)`: `InversionError` when the inversion was made by another model,
  at a size this model does not work at for its image, or with another sampler.
- `save_inversion(inversion, path, record=None)` / `load_inversion(path) -> Inversion`: the value as a
  .safetensors file (the latent, and its record in the metadata).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from icdcli.core.errors import ICDError
from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, Denoiser, PromptEmbedding
from icdcli.diffusion.p2p import REFINE, P2PBatch, P2PError, P2PPlan, P2PSettings, make_plan, prompt_words
from icdcli.diffusion.recipe import SamplerSettings
from icdcli.diffusion.sampler import (
    StepCallback,
    ddim_invert,
    ddim_sample,
    icd_decode,
    icd_encode,
    p2p_decode,
    p2p_pairs,
)
from icdcli.diffusion.schedule import NoiseSchedule
from icdcli.io.images import fit_size, image_to_tensor, tensor_to_image, tensors_to_images
from icdcli.models.api import EditModel


@dataclass
class Timings:
    """Seconds per stage, accumulated; `sync` (e.g. `torch.cuda.synchronize`) closes each stage, so that a stage
    ends when the device has finished its kernels, not when they were queued."""

    seconds: dict[str, float] = field(default_factory=dict)
    sync: Callable[[], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


INVERSION_FORMAT = 2
"""The version of the inversion file (`save_inversion`): 2 records the model hash, boundaries and sizes."""

UNGUIDED_PROMPTS = ("source", "target")
"""Which prompt the unguided steps of a prompt swap use (the release's `amplify_prompt`): the source preserves
more (icd's default), the target edits more."""


class InversionError(ICDError):
    """An inversion that cannot be edited with this model or these settings, or a file that is not one."""


@dataclass(frozen=True)
class PromptTable:
    """Encoded prompts by text, one row each, with the negative prompt and size conditioning a batch shares."""

    rows: dict[str, PromptEmbedding]
    negative: PromptEmbedding | None = None
    time_ids: torch.Tensor | None = None

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The conditioning of `prompts`, row by row (each prompt encoded before, in `rows`)."""
        chosen = [self.rows[prompt] for prompt in prompts]
        hidden = torch.cat([row.hidden_states for row in chosen])
        pooled = None if chosen[0].pooled is None else torch.cat([row.pooled for row in chosen])  # type: ignore[misc]
        return Conditioning(PromptEmbedding(hidden, pooled), self.negative, self.time_ids)

    def merged(self, other: PromptTable) -> PromptTable:
        """This table and `other`'s rows; the negative and time ids where either has them."""
        negative = self.negative if other.negative is None else other.negative
        time_ids = self.time_ids if other.time_ids is None else other.time_ids
        return PromptTable({**self.rows, **other.rows}, negative, time_ids)


def encode_prompts(
    model: EditModel,
    prompts: list[str],
    size: tuple[int, int],
    *,
    with_negative: bool = False,
    known: PromptTable | None = None,
) -> PromptTable:
    """The prompts not in `known`, each encoded once, in one text-encoder call (a negative prompt when asked).

    Edits encode their sources in one call and their new targets in another, so a decode from a saved inversion
    (whose sources were encoded when it was made) sees the very tensors a whole edit does."""
    width, height = size
    new = [prompt for prompt in dict.fromkeys(prompts) if known is None or prompt not in known.rows]
    rows: dict[str, PromptEmbedding] = {}
    negative = time_ids = None
    if new:
        cond = model.conditioning(new, height, width, with_negative=with_negative)
        for index, prompt in enumerate(new):
            pooled = None if cond.prompt.pooled is None else cond.prompt.pooled[index : index + 1]
            rows[prompt] = PromptEmbedding(cond.prompt.hidden_states[index : index + 1], pooled)
        negative, time_ids = cond.negative, cond.time_ids
    elif with_negative:  # every prompt known: only the negative is new
        assert known is not None and known.rows, "a negative prompt goes with prompts"
        like = next(iter(known.rows.values()))
        if like.pooled is not None:  # SDXL's negative is zeros, as prompt_conditioning makes it
            negative = PromptEmbedding(torch.zeros_like(like.hidden_states[:1]), torch.zeros_like(like.pooled[:1]))
        else:  # the empty prompt, encoded alone as prompt_conditioning encodes it
            negative = model.encode_prompt("")
    table = PromptTable(rows, negative, time_ids)
    return table if known is None else known.merged(table)


@dataclass
class Inversion:
    """The result of inverting an image: its noise latents and what they were made with.

    A value: the latents, the source prompt, the working size (width, height) they decode to, the size of the
    image they came from (`original_size`: what an edit of them returns), the sampler and seed (`settings`), and
    the identity of the model that made them (`model_hash`, `icdcli.models.identity`) with its boundaries. `prompts`
    caches the source prompt's encoding (in memory only, for this model), so an edit encodes only its target.
    """

    latents: torch.Tensor
    prompt: str
    size: tuple[int, int]
    original_size: tuple[int, int]
    settings: SamplerSettings
    model_hash: str = ""
    forward_boundaries: tuple[int, ...] = ()
    reverse_boundaries: tuple[int, ...] = ()
    model: str = ""
    """The model's name (`model.info.name`) or the label it was loaded by: what an error names."""
    record: dict[str, Any] = field(default_factory=dict)
    """What the command that made it records (the input file, its sha256 and size): kept in the file."""
    prompts: PromptTable | None = field(default=None, repr=False, compare=False)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator, so a seed means the same noise on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def working_size(model: EditModel, image: Image.Image) -> tuple[int, int]:
    return fit_size(image.width, image.height, native_size=model.info.native_size, multiple=model.info.size_multiple)


def stage_done(model: EditModel, role: str) -> None:
    """The `role` UNet's stage of an edit is over: a low-memory model frees its weights now (icdcli.models.memory)."""
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


def invert_for_edit(model: EditModel, image: Image.Image, source: str, settings: SamplerSettings) -> Inversion:
    """Invert `image` under its `source` prompt once, to edit it many times (`edit_inversion`).

    Computes what a whole edit (`edit_batch`) computes before its decode, the same way (the source prompt
    encoded alone, the same seeded noise), so an edit of the result gives the whole edit's pixels.

    Args:
        model: The model (PyTorch or accelerated) whose forward steps (or DDIM teacher) invert.
        image: The RGB photo; it is resized to the model's working size (edits return its own size).
        source: What the photo shows.
        settings: The sampler, its DDIM steps and the seed of the forward noise.
    """
    from icdcli.models.identity import model_hash

    size = working_size(model, image)
    sources = encode_prompts(model, [source], size)
    x0 = model.encode_image(torch.cat([image_to_tensor(image, size)]))
    job = EditJob(image, source, source, 1.0, 1.0, settings.seed)
    latents = _invert_rows(model, x0, [job], settings, sources.conditioning([source]))
    info = model.info
    return Inversion(latents, source, size, image.size, settings, model_hash(model), tuple(info.forward_boundaries),
                     tuple(info.reverse_boundaries), info.name, prompts=sources)  # fmt: skip


def check_inversion(model: EditModel, inversion: Inversion, settings: SamplerSettings) -> None:
    """InversionError unless `model` can decode `inversion` with `settings`: the model that made it, the working
    size this model gives its image, the sampler (and DDIM steps) it was inverted with."""
    from icdcli.models.identity import model_hash

    again = "or invert the image again with this model"
    if inversion.model_hash and inversion.model_hash != model_hash(model):
        made_by = f"{inversion.model} " if inversion.model else ""
        raise InversionError(
            f"the latents were inverted by another model ({made_by}{inversion.model_hash[:19]}), not "
            f"{model.info.name} ({model_hash(model)[:19]}): edit them with that model, {again}"
        )
    for role, bounds, here in (("forward", inversion.forward_boundaries, model.info.forward_boundaries),
                               ("reverse", inversion.reverse_boundaries, model.info.reverse_boundaries)):  # fmt: skip
        if bounds and tuple(bounds) != tuple(here):
            raise InversionError(
                f"the latents were made for {role} boundaries {list(bounds)}, this model's are {list(here)}: "
                f"edit them with the model that made them, {again}"
            )
    width, height = inversion.size
    expected_size = fit_size(*inversion.original_size, native_size=model.info.native_size,
                             multiple=model.info.size_multiple)  # fmt: skip
    factor = model.vae_scale_factor
    shape = (model.latent_channels, height // factor, width // factor)
    latents = inversion.latents
    if expected_size != inversion.size or latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
        raise InversionError(
            f"the latents are {tuple(latents.shape)} at a {width}x{height} working size; this model edits a "
            f"{inversion.original_size[0]}x{inversion.original_size[1]} image at {expected_size[0]}x{expected_size[1]} "
            f"({shape} latents): {again}"
        )
    made = inversion.settings
    if made.sampler != settings.sampler or (made.sampler == "ddim" and made.ddim_steps != settings.ddim_steps):
        used = "icd" if made.sampler == "icd" else f"ddim --ddim-steps {made.ddim_steps}"
        raise InversionError(
            f"the latents were inverted with --sampler {used}: decode them with the same sampler, "
            f"or invert the image again with --sampler {settings.sampler}"
        )


def edit_inversion(
    model: EditModel,
    inversion: Inversion,
    target: str,
    *,
    guidance: float,
    tau: float,
    settings: SamplerSettings,
    p2p: P2PSettings | None = None,
    unguided: str = "source",
    timings: Timings | None = None,
) -> Image.Image:
    """Edit an inverted image to `target`: the decode alone, pixel-identical to `edit` with the same settings.

    Args:
        model: The model that made the inversion (`check_inversion`).
        inversion: What `invert_for_edit` (or `load_inversion`) gave; its source prompt's encoding is cached on it.
        target: What the edited photo should show.
        guidance: The classifier-free guidance scale of the decode.
        tau: Decode steps with t > tau * 1000 run unguided.
        settings: The sampler and its DDIM steps (the inversion's; its seed is not used).
        p2p: Prompt-to-Prompt settings; None: prompt swap.
        unguided: Prompt swap: the prompt of the unguided steps, "source" (preserves more) or "target" (edits more).
        timings: Collects the seconds of the encode (the target prompt) and decode stages.

    Returns the edited image at the inverted image's size. Raises InversionError (another model, size or
    sampler), P2PError (P2P settings the prompts cannot use) or ICDError (a non-finite result).
    """
    if unguided not in UNGUIDED_PROMPTS:
        raise ValueError(f"unguided must be one of {', '.join(UNGUIDED_PROMPTS)}, got {unguided!r}")
    check_inversion(model, inversion, settings)
    timings = timings or Timings()
    size = inversion.size
    job = EditJob(Image.new("RGB", (1, 1)), inversion.prompt, target, guidance, tau, inversion.settings.seed, p2p,
                  unguided)  # fmt: skip
    plan = _p2p_plan(model, job, size, settings) if p2p is not None else None
    with timings.stage("encode"):
        cached = inversion.prompts
        if cached is None or inversion.prompt not in cached.rows or _device(cached) != model.device:
            cached = inversion.prompts = encode_prompts(model, [inversion.prompt], size)
        prompts = _target_prompts(model, [job], size, cached)
    with timings.stage("decode"):
        latents = inversion.latents.to(model.device)
        if plan is not None:
            decoded = _decode_p2p_rows(model, latents, [job], [plan], size, settings, cond=_pairs(prompts, [job]))
        else:
            decoded = _decode_swap_rows(model, latents, [job], settings, prompts)
        result = tensors_to_images(decoded, [inversion.original_size])[0]
    if isinstance(result, Exception):
        raise result
    return result


def _device(prompts: PromptTable) -> torch.device:
    return next(iter(prompts.rows.values())).hidden_states.device


def save_inversion(inversion: Inversion, path: str | Path, record: dict[str, Any] | None = None) -> None:
    """Write `inversion` as a .safetensors file: the tensor `latents`, and what made it in the metadata (with
    `record`, the command's parameter record, as JSON under `icd`). Writes `path` in place: callers that must
    never leave half a file write to a temporary path and rename it (`icdcli.io.atomic`)."""
    from safetensors.torch import save_file

    from icdcli import __version__
    from icdcli.core.values import strict_json

    width, height = inversion.size
    original_width, original_height = inversion.original_size
    settings = inversion.settings
    metadata = {
        "format": str(INVERSION_FORMAT),
        "prompt": inversion.prompt,
        "model": inversion.model,
        "model_hash": inversion.model_hash,
        "sampler": settings.sampler,
        "ddim_steps": str(settings.ddim_steps),
        "seed": str(settings.seed),
        "width": str(width),
        "height": str(height),
        "original_width": str(original_width),
        "original_height": str(original_height),
        "forward_boundaries": json.dumps(list(inversion.forward_boundaries)),
        "reverse_boundaries": json.dumps(list(inversion.reverse_boundaries)),
        "icd_version": __version__,
        "icd": strict_json(record if record is not None else inversion.record),
    }
    save_file({"latents": inversion.latents.detach().cpu().contiguous()}, str(path), metadata)


def load_inversion(path: str | Path) -> Inversion:
    """The inversion `save_inversion` wrote (on the CPU; `edit_inversion` moves it); InversionError when `path` is
    not such a file."""
    from safetensors import safe_open

    shown = str(path)
    if not Path(path).is_file():
        raise InversionError(f"{shown}: no such file; give a latent file that icd invert wrote")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            latents = handle.get_tensor("latents") if "latents" in names else None
    except Exception as error:  # safetensors raises its own error type for a damaged or foreign file
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InversionError(
            f"{shown} is not a latent file of icd invert ({reason}): make one with icd invert"
        ) from None
    if latents is None or "prompt" not in metadata:
        raise InversionError(
            f"{shown} is not a latent file of icd invert (no latents and prompt): make one with icd invert"
        )
    if metadata.get("format") != str(INVERSION_FORMAT):
        raise InversionError(
            f"{shown} was written by an older icd invert, without the model it was made by: invert the image "
            "again (icd invert IMAGE --prompt ... --overwrite)"
        )
    try:
        settings = SamplerSettings(metadata["sampler"], int(metadata["ddim_steps"]), int(metadata["seed"]))
        size = int(metadata["width"]), int(metadata["height"])
        original = int(metadata["original_width"]), int(metadata["original_height"])
        forward = tuple(int(value) for value in json.loads(metadata["forward_boundaries"]))
        reverse = tuple(int(value) for value in json.loads(metadata["reverse_boundaries"]))
        record = json.loads(metadata.get("icd") or "{}")
    except (KeyError, ValueError, TypeError) as error:
        raise InversionError(f"{shown}: its metadata is damaged ({error}); invert the image again") from None
    return Inversion(latents, metadata["prompt"], size, original, settings, metadata.get("model_hash", ""), forward,
                     reverse, metadata.get("model", ""), record if isinstance(record, dict) else {})  # fmt: skip


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
    unguided: str = "source"
    """Prompt swap: the prompt of the unguided steps, "source" (preserves more) or "target" (edits more)."""


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
    """
    job = EditJob(image, source_prompt, target_prompt, guidance, tau, settings.seed, p2p, unguided)
    result = edit_batch(model, [job], settings=settings, timings=timings)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _same(values: list) -> Any:
    """One value for all rows when they share it (a float keeps a batch of one on the scalar path), else (B,)."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32)


def edit_batch(
    model: EditModel,
    jobs: list[EditJob],
    *,
    settings: SamplerSettings,
    timings: Timings | None = None,
    callback: StepCallback | None = None,
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
            sources = encode_prompts(model, [job.source for job in chosen], size)
            pixels = torch.cat([image_to_tensor(job.image, size) for job in chosen])
            x0 = model.encode_image(pixels)
            latents = _invert_rows(model, x0, chosen, settings, sources.conditioning([job.source for job in chosen]))
            prompts = _target_prompts(model, chosen, size, sources)
        with timings.stage("decode"):
            if jobs[0].p2p is not None:
                plan = _planned(plans, runnable)
                cond = _pairs(prompts, chosen)
                decoded = _decode_p2p_rows(model, latents, chosen, plan, size, settings, callback, cond=cond)
            else:
                decoded = _decode_swap_rows(model, latents, chosen, settings, prompts, callback)
            # a job whose result is not finite gets its error; the others are kept
            images = tensors_to_images(decoded, [jobs[index].image.size for index in runnable])
            for index, image in zip(runnable, images, strict=True):
                results[index] = image
    return results  # type: ignore[return-value]


def _target_prompts(model: EditModel, jobs: list[EditJob], size: tuple[int, int], sources: PromptTable) -> PromptTable:
    """The sources' table with the jobs' targets not among them, encoded in one call (and the negative prompt
    when a guided step needs one)."""
    guided = any(model.needs_negative(job.guidance) for job in jobs)
    return encode_prompts(model, [job.target for job in jobs], size, with_negative=guided, known=sources)


def _pairs(prompts: PromptTable, jobs: list[EditJob]) -> Conditioning:
    """P2P's rows: (source, target) of each job, interleaved."""
    return prompts.conditioning([prompt for job in jobs for prompt in (job.source, job.target)])


def _edit_conditioning(model: EditModel, jobs: list[EditJob], size: tuple[int, int]) -> PromptTable:
    """Every prompt of the jobs encoded once, as an edit encodes them: the sources in one call, new targets in
    another."""
    return _target_prompts(model, jobs, size, encode_prompts(model, [job.source for job in jobs], size))


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
    prompts: PromptTable,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    for job in jobs:
        if job.unguided not in UNGUIDED_PROMPTS:
            raise ValueError(f"the unguided prompt is one of {', '.join(UNGUIDED_PROMPTS)}, got {job.unguided!r}")
    cond = prompts.conditioning([job.target for job in jobs])
    unguided = prompts.conditioning([job.source if job.unguided == "source" else job.target for job in jobs])
    guidance = _same([job.guidance for job in jobs])
    tau = _same([job.tau for job in jobs])
    return _decode_latents(model, latents, cond, unguided, guidance, tau, settings, callback)


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
        cond = _pairs(_edit_conditioning(model, jobs, size), jobs)
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
