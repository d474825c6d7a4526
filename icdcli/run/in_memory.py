"""Images edited in memory, as a call of `icdcli.ICDEditPipeline` edits them: a prompt and a seed per image (or a
generator's), the images grouped by working size and edited in batches (`icdcli.editing.edits.edit_batch`, as
`icd edit` batches files: each image's result is the one it would have alone), and diffusers' step-end callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

    from icdcli.diffusion.recipe import ResolvedEdit
    from icdcli.models.api import EditModel

StepEndCallback = Callable[[Any, int, int, dict[str, Any]], "dict[str, Any] | None"]
"""`callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`, as diffusers calls it after each step."""

CALLBACK_TENSOR_INPUTS = ("latents",)
"""The tensors a step-end callback may ask for (`callback_on_step_end_tensor_inputs`) and return changed."""


@dataclass(frozen=True)
class StepEnd:
    """A call's step-end callback: `callback(owner, step, timestep, callback_kwargs)` after each decode step, the
    kwargs holding the tensors named in `tensor_inputs` (or in the callback's own `tensor_inputs`)."""

    owner: Any
    callback: StepEndCallback | None = None
    tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS

    def names(self) -> list[str]:
        """The tensors the callback gets (ValueError for one it cannot have)."""
        names = list(getattr(self.callback, "tensor_inputs", self.tensor_inputs))
        unknown = [name for name in names if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs can hold {list(CALLBACK_TENSOR_INPUTS)}, not {unknown}"
            )
        return names


def per_image_mask(
    mask: Image.Image | Sequence[Image.Image | None] | None, count: int
) -> list[Image.Image | None] | None:
    """A call's `mask_image`: one for all images, or one (or None) per image."""
    if mask is None or isinstance(mask, Image.Image):
        return None if mask is None else [mask] * count
    masks = list(mask)
    if len(masks) != count:
        raise ValueError(f"mask_image has {len(masks)} masks for {count} images: give one, or one per image")
    return masks


def per_image(prompt: str | Sequence[str], count: int, label: str) -> list[str]:
    """One prompt for every image, or a list with one per image."""
    if isinstance(prompt, str):
        return [prompt] * count
    prompts = list(prompt)
    if len(prompts) != count:
        raise ValueError(f"{label} holds {len(prompts)} prompts for {count} images: give one, or one per image")
    return prompts


def image_seeds(generator: Any, seed: int | None, count: int) -> list[int] | None:
    """Each image's seed from a generator (the same for all) or a list of them (one per image); None without one."""
    if generator is None:
        return None
    if seed is not None:
        raise ValueError("give seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} images: give one, or one per image")
        return [int(one.initial_seed()) for one in generator]
    return [int(generator.initial_seed())] * count


def batch_limit(device_type: str, size: tuple[int, int], given: int | None) -> int:
    """Images of one working size per network call: `given`, else the command line's default for the device."""
    from icdcli.run.batch import default_batch_size

    if given is not None:
        if given < 1:
            raise ValueError(f"batch_size must be at least 1, got {given}")
        return given
    return default_batch_size(device_type, size[0] * size[1])


def decode_timesteps(model: EditModel, settings: ResolvedEdit) -> list[int]:
    """The timestep each decode step starts from."""
    from icdcli.diffusion.sampler import p2p_pairs

    ddim = settings.sampling.sampler == "ddim"
    pairs = p2p_pairs(None if ddim else model.info.reverse_boundaries, settings.sampling.ddim_steps)
    return [t for t, _ in pairs]


def step_callback(
    step_end: StepEnd, timesteps: list[int], bar: Any, names: list[str], p2p: bool
) -> Callable[[int, int, torch.Tensor], None] | None:
    """The sampler's step callback (`icdcli.diffusion.sampler.StepCallback`) that advances `bar` and calls the
    step-end callback diffusers' way; None when neither would do anything."""
    callback = step_end.callback
    if callback is None and bar.disable:
        return None

    def on_step(index: int, reached: int, latents: torch.Tensor) -> None:
        if callback is not None:
            rows = latents[1::2] if p2p else latents  # a P2P decode's rows: (source, target) of each edit
            returned = callback(step_end.owner, index, timesteps[index], {name: rows for name in names}) or {}
            changed = returned.get("latents")
            if changed is not None and changed is not rows:
                if tuple(changed.shape) != tuple(rows.shape):
                    raise ValueError(
                        f"callback_on_step_end returned latents of shape {tuple(changed.shape)}, "
                        f"not {tuple(rows.shape)}"
                    )
                rows.copy_(changed)  # in place: the sampler goes on from this very tensor
        bar.update(1)

    return on_step


def edit_images(
    model: EditModel,
    images: list[Image.Image],
    sources: list[str],
    targets: list[str],
    settings: ResolvedEdit,
    *,
    seeds: list[int],
    unguided: str,
    batch_size: int | None,
    progress_bar: Callable[[int], Any],
    step_end: StepEnd,
    masks: Sequence[Image.Image | None] | None = None,
) -> list[Image.Image]:
    """Edit each image from its source prompt to its target with its seed, in batches of one working size; the
    results at the inputs' own sizes, in their order. `progress_bar(total)` makes the bar of the decode steps;
    `masks`: each image's region that may change (`icdcli.io.images.photo_mask`), or None."""
    from icdcli.editing.edits import EditJob, edit_batch
    from icdcli.editing.reuse import model_inversions
    from icdcli.editing.stages import working_size
    from icdcli.io.images import photo_mask, photo_rgb

    names = step_end.names()
    given = zip(images, sources, targets, seeds, masks or [None] * len(images), strict=True)
    jobs = [
        EditJob(photo_rgb(picture), source, target, settings.guidance, settings.tau, seed, settings.p2p, unguided,
                None if mask is None else photo_mask(mask, picture.size, label=f"mask_image[{index}]"))
        for index, (picture, source, target, seed, mask) in enumerate(given)
    ]  # fmt: skip
    groups: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(working_size(model, job.image), []).append(index)
    batches = []
    for size, indices in groups.items():
        limit = batch_limit(model.device.type, size, batch_size)
        batches += [indices[start : start + limit] for start in range(0, len(indices), limit)]
    edited: list[Image.Image | None] = [None] * len(jobs)
    timesteps = decode_timesteps(model, settings)
    with progress_bar(len(batches) * len(timesteps)) as bar:
        for batch in batches:
            on_step = step_callback(step_end, timesteps, bar, names, settings.p2p is not None)
            chosen = [jobs[index] for index in batch]
            inversions = model_inversions(model)  # a photo edited again (another target) is not inverted again
            if on_step is None:  # the command line's call, exactly
                results = edit_batch(model, chosen, settings=settings.sampling, inversions=inversions)
            else:
                results = edit_batch(model, chosen, settings=settings.sampling, callback=on_step, inversions=inversions)
            for index, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    raise result
                edited[index] = result
    return [picture for picture in edited if picture is not None]
