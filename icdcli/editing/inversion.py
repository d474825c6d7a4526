"""An inversion as a value: the inverted latent and what made it, checked against the model that edits it, kept in a
.safetensors file; invert once (`invert_for_edit`), edit many (`edit_inversion`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from icdcli.core.errors import ICDError
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.diffusion.sampler import StepCallback
from icdcli.editing.edits import (
    UNGUIDED_PROMPTS,
    EditJob,
    decode_p2p_rows,
    decode_swap_rows,
    p2p_plan,
    pair_conditioning,
    region_keeper,
    target_prompts,
)
from icdcli.editing.generation import invert_latents
from icdcli.editing.region import paste_outside
from icdcli.editing.stages import PromptTable, Timings, encode_prompts, invert_rows, working_size
from icdcli.io.images import fit_size, image_to_tensor, tensors_to_images
from icdcli.models.api import EditModel
from icdcli.models.identity import model_hash

INVERSION_FORMAT = 2
"""The version of the inversion file (`save_inversion`): 2 records the model hash, boundaries and sizes."""
TRAJECTORY_PREFIX = "trajectory."
"""The inversion file's tensors of the latents at each timestep the inversion landed on: `trajectory.259`, ..."""


class InversionError(ICDError):
    """An inversion that cannot be edited with this model or these settings, or a file that is not one."""


@dataclass
class Inversion:
    """The result of inverting an image: its noise latents and what they were made with.

    A value: the latents, the source prompt, the working size (width, height) they decode to, the size of the
    image they came from (`original_size`: what an edit of them returns), the sampler and seed (`settings`), and
    the identity of the model that made them (`model_hash`, `icdcli.models.identity`) with its boundaries. `prompts`
    caches the source prompt's encoding (in memory only, for this model), so an edit encodes only its target.
    `trajectory` holds the latents of each timestep the inversion landed on, the clean ones at 0 (what local blend
    keeping the inversion needs; kept in the file too); None for latents made without them.
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
    trajectory: dict[int, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    """The photo as it was inverted (in memory only, not in the file): what a masked edit keeps outside its mask."""


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
    size = working_size(model, image)
    sources = encode_prompts(model, [source], size)
    x0 = model.encode_image(torch.cat([image_to_tensor(image, size)]))
    trajectory: dict[int, torch.Tensor] = {}
    latents = invert_rows(model, x0, [settings.seed], settings, sources.conditioning([source]), trajectory)
    info = model.info
    return Inversion(latents, source, size, image.size, settings, model_hash(model), tuple(info.forward_boundaries),
                     tuple(info.reverse_boundaries), info.name, prompts=sources, trajectory=trajectory,
                     image=image)  # fmt: skip


def check_inversion(model: EditModel, inversion: Inversion, settings: SamplerSettings) -> None:
    """InversionError unless `model` can decode `inversion` with `settings`: the model that made it, the working
    size this model gives its image, the sampler (and DDIM steps) it was inverted with."""
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
    mask: Image.Image | None = None,
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
        mask: The region that may change (`icdcli.editing.region`), at the inverted image's size: the decode keeps
            the inversion's latents outside it, and the result the photo's pixels where the inversion has its
            `image` (else the VAE's rendering of them).

    Returns the edited image at the inverted image's size. Raises InversionError (another model, size or
    sampler), P2PError (P2P settings the prompts cannot use) or ICDError (a non-finite result).
    """
    if unguided not in UNGUIDED_PROMPTS:
        raise ValueError(f"unguided must be one of {', '.join(UNGUIDED_PROMPTS)}, got {unguided!r}")
    check_inversion(model, inversion, settings)
    timings = timings or Timings()
    size = inversion.size
    job = EditJob(Image.new("RGB", (1, 1)), inversion.prompt, target, guidance, tau, inversion.settings.seed, p2p,
                  unguided, mask)  # fmt: skip
    plan = p2p_plan(model, job, size, settings) if p2p is not None else None
    with timings.stage("encode"):
        cached = inversion.prompts
        if cached is None or inversion.prompt not in cached.rows or _device(cached) != model.device:
            cached = inversion.prompts = encode_prompts(model, [inversion.prompt], size)
        prompts = target_prompts(model, [job], size, cached)
    with timings.stage("decode"):
        latents = inversion.latents.to(model.device)
        trajectory = None
        if inversion.trajectory is not None:
            trajectory = {t: x.to(model.device) for t, x in inversion.trajectory.items()}
        elif mask is not None or (job.p2p is not None and job.p2p.keeps_inversion):
            what, other = (
                ("an edit held to a mask", "")
                if mask is not None
                else ("local blend keeping the inversion", ", or keep the source branch (--blend-keep source)")
            )
            raise InversionError(f"these latents carry no inversion steps, which {what} needs: invert the image "
                                 f"again with this icd (icd invert ... --overwrite){other}")  # fmt: skip
        callback = None
        if mask is not None:
            assert trajectory is not None
            callback = region_keeper([job], trajectory, tuple(latents.shape[-2:]), p2p=plan is not None, then=None)
        if plan is not None:
            cond = pair_conditioning(prompts, [job])
            decoded = decode_p2p_rows(model, latents, [job], [plan], size, settings, callback, cond=cond,
                                      trajectory=trajectory)  # fmt: skip
        else:
            decoded = decode_swap_rows(model, latents, [job], settings, prompts, callback)
        result = tensors_to_images(decoded, [inversion.original_size])[0]
    if isinstance(result, Exception):
        raise result
    if mask is not None and inversion.image is not None:
        result = paste_outside(inversion.image.resize(result.size) if inversion.image.size != result.size
                               else inversion.image, result, mask)  # fmt: skip
    return result


def _device(prompts: PromptTable) -> torch.device:
    return next(iter(prompts.rows.values())).hidden_states.device


def save_inversion(inversion: Inversion, path: str | Path, record: dict[str, Any] | None = None) -> None:
    """Write `inversion` as a .safetensors file: the tensor `latents` (and the trajectory's as `trajectory.T`, but
    for its last step, which is `latents`: the metadata's `trajectory_final` names its timestep), and what made it
    in the metadata (with `record`, the command's parameter record, as JSON under `icd`). Writes `path` in place:
    callers that must never leave half a file write to a temporary path and rename it (`icdcli.io.atomic`).
    """
    from safetensors.torch import save_file

    from icdcli.core.values import strict_json
    from icdcli.core.version import __version__

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
    tensors = {"latents": inversion.latents.detach().cpu().contiguous()}
    for t, latents in (inversion.trajectory or {}).items():
        kept = latents.detach().cpu()
        if "trajectory_final" not in metadata and torch.equal(kept, tensors["latents"]):
            metadata["trajectory_final"] = str(int(t))  # the last step's latents are `latents`: stored once
            continue
        tensors[f"{TRAJECTORY_PREFIX}{int(t)}"] = kept.clone()
    save_file(tensors, str(path), metadata)


def _inversion_problem(
    latents: torch.Tensor,
    trajectory: dict[int, torch.Tensor] | None,
    size: tuple[int, int],
    original: tuple[int, int],
    prompt: str,
) -> str | None:
    """What is wrong with a latent file's contents (what icd invert never writes), or None."""
    from icdcli.core.texts import TextError, check_text
    from icdcli.io.images import MAX_IMAGE_PIXELS, MIN_SIDE

    if latents.ndim != 4 or latents.shape[0] != 1:
        return f"its latents have the shape {tuple(latents.shape)}, not one image's (1, C, H, W)"
    if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
        return "its latents are not finite floating-point numbers"
    if any(x.shape != latents.shape for x in (trajectory or {}).values()):
        return "its trajectory's latents do not have the shape of its latents"
    if min(size) < 1 or size[0] * size[1] > MAX_IMAGE_PIXELS:
        return f"its working size {size[0]}x{size[1]} is damaged"
    if min(original) < MIN_SIDE or original[0] * original[1] > MAX_IMAGE_PIXELS:
        return (f"its image size {original[0]}x{original[1]} is damaged (icd reads {MIN_SIDE} px sides to "
                f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels)")  # fmt: skip
    try:
        check_text("prompt", prompt, "its prompt")
    except TextError as error:
        return str(error)
    return None


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
            steps = {name: handle.get_tensor(name) for name in names if name.startswith(TRAJECTORY_PREFIX)}
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
        trajectory = {int(name.removeprefix(TRAJECTORY_PREFIX)): x for name, x in steps.items()} if steps else None
        if trajectory is not None and "trajectory_final" in metadata:
            trajectory[int(metadata["trajectory_final"])] = latents
    except (KeyError, ValueError, TypeError) as error:
        raise InversionError(f"{shown}: its metadata is damaged ({error}); invert the image again") from None
    problem = _inversion_problem(latents, trajectory, size, original, metadata["prompt"])
    if problem is not None:
        raise InversionError(f"{shown}: {problem}; invert the image again")
    return Inversion(latents, metadata["prompt"], size, original, settings, metadata.get("model_hash", ""), forward,
                     reverse, metadata.get("model", ""), record if isinstance(record, dict) else {},
                     trajectory=trajectory)  # fmt: skip
