"""A diffusers-style Python entry point: load once, call with images and prompts.

    from icdcli import ICDEditPipeline

    pipe = ICDEditPipeline.from_pretrained("sd15", torch_dtype=torch.float16).to("cuda")
    edited = pipe(Image.open("cat.jpg"), "a cat", "a dog", generator=torch.Generator().manual_seed(30))[0]

Defaults, methods and backends are the command line's: the model's edit recipe under whatever the
call gives, the same P2P settings, the same image fitting, and a list of images is edited in batches
through `icdcli.diffusion.editing.edit_batch`, as `icd edit` edits several; `icd edit` and this class give the same
pixels for the same settings. What diffusers users reach for is here too: `torch_dtype`, `.to()`,
`.device` / `.dtype`, `generator`, `callback_on_step_end`, `set_progress_bar_config`, `from_pipe`, and an
output that indexes like a list of images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from PIL import Image

from icdcli.diffusion.recipe import P2POptions, ResolvedEdit, resolve_edit

if TYPE_CHECKING:
    import torch

    from icdcli.diffusion.editing import EditJob, Inversion
    from icdcli.models.api import EditModel

StepEndCallback = Callable[[Any, int, int, dict[str, Any]], "dict[str, Any] | None"]
"""`callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`, as diffusers calls it after each step."""

CALLBACK_TENSOR_INPUTS = ("latents",)
"""The tensors a step-end callback may ask for (`callback_on_step_end_tensor_inputs`) and return changed."""


@dataclass
class ICDEditOutput:
    """What a call returns: one edited image per input, at the input's own size, and the settings used.

    It indexes like a list of its images (`out[0]`, `len(out)`, `for image in out`), and like diffusers' outputs
    has them as `out.images`. `seeds` holds each image's seed (they differ only with a list of generators);
    `settings.seed` is the first's.
    """

    images: list[Image.Image]
    settings: ResolvedEdit
    seeds: list[int] = field(default_factory=list)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        return self.images[index]

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


class ICDEditPipeline:
    """An iCD model ready to edit; `from_pretrained` (or `from_pipe`) loads it, calling it edits."""

    def __init__(self, model: EditModel, backend: str = "torch") -> None:
        self.model = model
        self.backend = backend
        self._progress_bar_config: dict[str, Any] = {}

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        base: str | None = None,
        teacher: str | None = None,
        forward_lora: str | None = None,
        reverse_lora: str | None = None,
        device: str = "auto",
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "torch",
    ) -> ICDEditPipeline:
        """Load a model as `icd edit --model ...` does, without the libraries' loading warnings and bars.

        Args:
            model: a preset name (`sd15`, `sdxl`, ...), a model or release folder, a hub id, or None for the
                embedded model.
            base, teacher, forward_lora, reverse_lora: parts by local path, as the flags of the same names.
            device: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.
            torch_dtype: the UNets' and text encoders' dtype (`torch.float16`, or its name); None: float16 on CUDA,
                float32 elsewhere. The VAE's follows the device, as on the command line.
            dtype: the same as `torch_dtype` (an older name of it).
            backend: `torch`, `onnxruntime`, `tensorrt` or `auto` (the fastest present).
        """
        import torch

        from icdcli.core.quiet import libraries_quieted
        from icdcli.models.runtime import resolve_device
        from icdcli.models.sources import ModelRequest, load_requested_model

        chosen = _dtype(_one_dtype(torch_dtype, dtype))
        target = resolve_device(device)
        half = chosen == torch.float16 or (chosen is None and target.type == "cuda")  # as the command line
        with libraries_quieted():
            loaded = load_requested_model(ModelRequest(model, base, teacher, forward_lora, reverse_lora, half=half))
            loaded.to(target, chosen)
        if backend == "torch":
            return cls(loaded, backend)
        from icdcli.backends.accelerated import accelerate, select_backend

        backend = select_backend(backend, device=loaded.device)
        return cls(accelerate(loaded, backend), backend)

    @classmethod
    def from_pipe(
        cls,
        pipeline: Any,
        *,
        forward_lora: str | os.PathLike[str],
        reverse_lora: str | os.PathLike[str],
        teacher: str | os.PathLike[str] | None = None,
        forward_boundaries: Sequence[int] | None = None,
        reverse_boundaries: Sequence[int] | None = None,
        keep_teacher: bool = False,
        name: str = "",
    ) -> ICDEditPipeline:
        """An iCD model over a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` already loaded.

        The VAE, text encoder(s) and tokenizer(s) are the pipeline's own modules, shared, not copied: this class
        sets them to eval mode without gradients, and moving either pipeline moves them for both. The forward and
        reverse UNets are new: each LoRA fused into a copy of the teacher UNet, as `icd` fuses released files
        (`icdcli.models.runtime.build_teacher_unet`, `icdcli.models.lora.fuse_lora`), in the pipeline UNet's dtype and
        on its device. The edit recipe is the family's release recipe.

        Args:
            pipeline: the diffusers pipeline (its `vae`, `unet`, `text_encoder`, `tokenizer`, and for SDXL
                `text_encoder_2`, `tokenizer_2`).
            forward_lora, reverse_lora: the released PEFT LoRA files (`iCD-SD15-forward_19_259_519_779.safetensors`).
            teacher: the guidance-distilled teacher UNet state dict (.safetensors, or .pt read weights-only) the
                LoRAs were trained on, in the pipeline UNet's architecture; None: the pipeline's UNet is the teacher.
            forward_boundaries, reverse_boundaries: for LoRA files whose names do not carry them.
            keep_teacher: also keep the teacher UNet, for `sampler="ddim"` (with `teacher=None` it is the
                pipeline's UNet, kept at no cost).
            name: the model's name in records; default: the reverse LoRA's folder.
        """
        import copy
        import tempfile

        from icdcli.core.errors import ModelSourceError
        from icdcli.core.quiet import libraries_quieted
        from icdcli.diffusion.recipe import SD15, SDXL
        from icdcli.models.identity import made_from
        from icdcli.models.lora import fuse_lora, read_lora
        from icdcli.models.runtime import (
            ICDModel,
            LoraSources,
            ModelInfo,
            _describe,
            build_teacher_unet,
            check_weights,
        )

        family = SDXL if getattr(pipeline, "text_encoder_2", None) is not None else SD15
        suffixes = ("", "_2") if family == SDXL else ("",)
        needed = ["vae", "unet", *(f"{part}{suffix}" for suffix in suffixes for part in ("text_encoder", "tokenizer"))]
        missing = [part for part in needed if getattr(pipeline, part, None) is None]
        if missing:
            raise TypeError(f"from_pipe takes a diffusers Stable Diffusion (XL) pipeline; this one lacks {missing}")
        unet = pipeline.unet
        sources = LoraSources(
            base=Path(getattr(pipeline.config, "_name_or_path", "") or "pipeline"),
            teacher=None if teacher is None else Path(teacher),
            forward_lora=Path(forward_lora),
            reverse_lora=Path(reverse_lora),
            name=name,
            forward_boundaries=None if forward_boundaries is None else tuple(forward_boundaries),
            reverse_boundaries=None if reverse_boundaries is None else tuple(reverse_boundaries),
        )
        for label, path in (("teacher", sources.teacher), ("forward_lora", sources.forward_lora),
                            ("reverse_lora", sources.reverse_lora)):  # fmt: skip
            if path is not None and not path.is_file():
                raise ModelSourceError(f"{label} {path} does not exist")
        forward_bounds, reverse_bounds = sources.boundaries()
        dtype, device = unet.dtype, unet.device
        unets: dict[str, Any] = {}
        with libraries_quieted(), tempfile.TemporaryDirectory(prefix="icd-from-pipe-") as folder:
            base = Path(folder)
            unet.save_config(base / "unet")  # the architecture build_teacher_unet fills with the teacher's weights
            for role, path in (("forward", sources.forward_lora), ("reverse", sources.reverse_lora)):
                check_weights(path)
                try:
                    adapter = read_lora(path)
                    if sources.teacher is None:
                        unets[role] = fuse_lora(copy.deepcopy(unet), adapter)
                    else:
                        unets[role] = build_teacher_unet(base, sources.teacher, dtype=dtype, fuse=adapter)
                except (ValueError, OSError) as error:
                    raise ModelSourceError(f"cannot fuse {path}: {error}") from error
            teacher_unet = unet if sources.teacher is None else None
            if keep_teacher and sources.teacher is not None:
                teacher_unet = build_teacher_unet(base, sources.teacher, dtype=dtype)
            info_json = {
                "name": name or sources.reverse_lora.parent.name,
                "forward_boundaries": forward_bounds,
                "reverse_boundaries": reverse_bounds,
                "edit": sources.recipe(family, reverse_bounds).to_json(),
                "made_from": made_from(sources),
            }
            info = ModelInfo.from_json(_describe(info_json, unets["reverse"], pipeline.vae, family))
            encoders = [getattr(pipeline, f"text_encoder{suffix}") for suffix in suffixes]
            tokenizers = [getattr(pipeline, f"tokenizer{suffix}") for suffix in suffixes]
            model = ICDModel(info, pipeline.vae, encoders, tokenizers, unets["forward"], unets["reverse"],
                             teacher_unet=teacher_unet, source=str(sources.reverse_lora.parent))  # fmt: skip
            model.to(device, dtype, vae_dtype=pipeline.vae.dtype)
        return cls(model, "torch")

    # --- where it runs -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device the networks run on."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNets' and text encoders' dtype (the VAE's may differ: `model.vae_dtype`)."""
        return self.model.dtype

    def to(
        self, *args: Any, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> ICDEditPipeline:
        """Move the model, as diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`
        or `pipe.to(device=..., dtype=...)` do, and return this pipeline.

        What is not given stays: a device alone keeps the dtype, a dtype alone the device. The VAE's dtype follows
        the device, as on the command line (float32, or on CUDA float16 for SD1.5 and bfloat16 for SDXL). A model on
        ONNX Runtime or TensorRT cannot move (its sessions are bound to a device): load it where it should run.
        """
        import torch

        from icdcli.core.quiet import libraries_quieted
        from icdcli.models.runtime import resolve_device

        for arg in args:
            if isinstance(arg, torch.dtype) or (isinstance(arg, str) and _named_dtype(arg) is not None):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device and/or a dtype, not {type(arg).__name__}")
        target = self.device if device is None else resolve_device(str(device))
        move = getattr(self.model, "to", None)  # an ICDModel's; an accelerated model's says why it cannot
        if move is None:
            from icdcli.core.errors import ICDError

            raise ICDError(f"a model on {self.backend} cannot move: load it where it should run")
        with libraries_quieted():
            move(target, _dtype(dtype) or self.dtype)
        return self

    # --- progress ------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options of the tqdm bar a call draws over its decode steps (`disable=True` turns it off, `file=`,
        `desc=`, `leave=` ...), replacing those set before. By default the bar is drawn on stderr when stderr is a
        terminal and not otherwise (tqdm's `disable=None`); `disable=False` draws it anywhere."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, total: int) -> Any:
        """A tqdm bar of `total` steps under this pipeline's configuration."""
        from tqdm.auto import tqdm

        return tqdm(total=total, **{"disable": None, "desc": "decoding", **self._progress_bar_config})

    # --- editing -------------------------------------------------------------------------------------

    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        source_prompt: str | Sequence[str],
        target_prompt: str | Sequence[str],
        *,
        method: str = "auto",
        guidance: float | None = None,
        tau: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sampler: str = "icd",
        ddim_steps: int = 50,
        p2p: P2POptions | None = None,
        unguided: str = "source",
        batch_size: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
    ) -> ICDEditOutput:
        """Edit `image` (or each of a list) from `source_prompt` to `target_prompt`.

        A list of images is edited in batches of one working size (`icdcli.diffusion.editing.edit_batch`, as `icd edit`
        edits several): each image's result is the one it would have alone.

        Args:
            image: a PIL image or a list of them; any size (fitted to the model's area, returned at its own).
            source_prompt: what the image shows; target_prompt: what it should show. One for all images, or a list
                with one per image.
            method: `auto` (the model's recipe), `p2p` or `swap`.
            guidance, tau, seed: None for the model's recipe.
            generator: a `torch.Generator`, or a list with one per image, instead of `seed`: a generator's
                `initial_seed()` is the edit's seed (its state is not drawn from), so `generator=torch.Generator()
                .manual_seed(7)` gives what `seed=7` gives, on any device.
            sampler: `icd`, or `ddim` for the 50-step teacher baseline (`ddim_steps`).
            p2p: Prompt-to-Prompt values (step fractions, blend and amplify words); None: the recipe's.
            unguided: prompt swap: the prompt of the unguided steps, `source` (preserves more) or `target` (edits
                more; the release's `amplify_prompt`).
            batch_size: images per network call; None: by device and size, as on the command line.
            callback_on_step_end: called after each decode step as `callback(pipe, step, timestep,
                callback_kwargs)`, `timestep` the one the step started from (999, 779, ... for the 4-step release)
                and `callback_kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs`: `latents`,
                the batch's latents after the step (the target branches' of a P2P edit). It returns a dict; a
                `latents` in it replaces them (same shape). With several batches, each runs its own steps.
            callback_on_step_end_tensor_inputs: which tensors the callback gets: `latents`.
        """
        from icdcli.diffusion.editing import EditJob, working_size

        tensor_inputs = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        unknown = [name for name in tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs can hold {list(CALLBACK_TENSOR_INPUTS)}, not {unknown}"
            )
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images:
            raise ValueError("no image to edit")
        sources = _per_image(source_prompt, len(images), "source_prompt")
        targets = _per_image(target_prompt, len(images), "target_prompt")
        seeds = _generator_seeds(generator, len(images))
        if seeds is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        info = self.model.info
        settings = resolve_edit(info.edit, info.generate_guidance, sampler=sampler, method=method, guidance=guidance,
                                tau=tau, seed=seed if seeds is None else seeds[0], p2p=p2p,
                                ddim_steps=ddim_steps)  # fmt: skip
        seeds = seeds or [settings.seed] * len(images)
        given = zip(images, sources, targets, seeds, strict=True)
        jobs = [
            EditJob(picture.convert("RGB"), source, target, settings.guidance, settings.tau, job_seed, settings.p2p,
                    unguided)
            for picture, source, target, job_seed in given
        ]  # fmt: skip
        groups: dict[tuple[int, int], list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(working_size(self.model, job.image), []).append(index)
        batches = [
            chunk for size, indices in groups.items() for chunk in _chunks(indices, self._batch(size, batch_size))
        ]
        edited: list[Image.Image | None] = [None] * len(jobs)
        steps = self._decode_timesteps(settings)
        with self.progress_bar(len(batches) * len(steps)) as bar:
            for batch in batches:
                on_step = self._step_callback(steps, bar, callback_on_step_end, tensor_inputs, settings.p2p is not None)
                for index, result in zip(batch, self._edit([jobs[i] for i in batch], settings, on_step), strict=True):
                    if isinstance(result, Exception):
                        raise result
                    edited[index] = result
        return ICDEditOutput([picture for picture in edited if picture is not None], settings, seeds)

    def _edit(self, jobs: list[EditJob], settings: ResolvedEdit, on_step: Any) -> list[Image.Image | Exception]:
        from icdcli.diffusion.editing import edit_batch

        if on_step is None:  # the command line's call, exactly
            return edit_batch(self.model, jobs, settings=settings.sampling)
        return edit_batch(self.model, jobs, settings=settings.sampling, callback=on_step)

    def _batch(self, size: tuple[int, int], given: int | None) -> int:
        from icdcli.run.batch import default_batch_size

        if given is not None:
            if given < 1:
                raise ValueError(f"batch_size must be at least 1, got {given}")
            return given
        return default_batch_size(self.device.type, size[0] * size[1])

    def _decode_timesteps(self, settings: ResolvedEdit) -> list[int]:
        """The timestep each decode step starts from."""
        from icdcli.diffusion.sampler import p2p_pairs

        ddim = settings.sampling.sampler == "ddim"
        pairs = p2p_pairs(None if ddim else self.model.info.reverse_boundaries, settings.sampling.ddim_steps)
        return [t for t, _ in pairs]

    def _step_callback(
        self,
        timesteps: list[int],
        bar: Any,
        callback: StepEndCallback | None,
        tensor_inputs: list[str],
        p2p: bool,
    ) -> Callable[[int, int, torch.Tensor], None] | None:
        """The sampler's step callback (`icdcli.diffusion.sampler.StepCallback`) that advances `bar` and calls
        `callback` diffusers' way; None when neither would do anything."""
        if callback is None and bar.disable:
            return None

        def on_step(index: int, reached: int, latents: torch.Tensor) -> None:
            if callback is not None:
                rows = latents[1::2] if p2p else latents  # a P2P decode's rows: (source, target) of each edit
                given = {name: rows for name in tensor_inputs}
                returned = callback(self, index, timesteps[index], given) or {}
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

    # --- invert once, edit many ----------------------------------------------------------------------

    def invert(
        self,
        image: Image.Image,
        prompt: str,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "icd",
        ddim_steps: int = 50,
    ) -> Inversion:
        """Invert `image` under `prompt` (what it shows) once, to edit it many times with `edit`
        (`icdcli.diffusion.editing.invert_for_edit`).

        Args:
            image: a PIL image, any size.
            prompt: the source prompt.
            seed, generator: the seed of the noise added before inversion, as a call takes them; None: the recipe's.
            sampler: `icd`, or `ddim` for the teacher's DDIM inversion (`ddim_steps`).
        """
        from icdcli.diffusion.editing import invert_for_edit

        seeds = _generator_seeds(generator, 1)
        if seeds is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        info = self.model.info
        chosen = seed if seeds is None else seeds[0]
        settings = resolve_edit(info.edit, info.generate_guidance, sampler=sampler, method="swap", seed=chosen,
                                ddim_steps=ddim_steps)  # fmt: skip
        return invert_for_edit(self.model, image.convert("RGB"), prompt, settings.sampling)

    def edit(
        self,
        inversion: Inversion,
        target_prompt: str,
        *,
        method: str = "auto",
        guidance: float | None = None,
        tau: float | None = None,
        p2p: P2POptions | None = None,
        unguided: str = "source",
    ) -> ICDEditOutput:
        """Edit an inversion (`invert`) to `target_prompt`: the decode alone, the pixels a whole call with the same
        settings gives (`icdcli.diffusion.editing.edit_inversion`). The sampler and seed are the inversion's.

        Args:
            inversion: what `invert` returned, from this pipeline's model.
            target_prompt: what the edited image should show.
            method, guidance, tau, p2p: as a call takes them; None: the recipe's.
            unguided: prompt swap: the prompt of the unguided steps, `source` (preserves more) or `target`.
        """
        from icdcli.diffusion.editing import edit_inversion

        info, made = self.model.info, inversion.settings
        settings = resolve_edit(info.edit, info.generate_guidance, sampler=made.sampler, method=method,
                                guidance=guidance, tau=tau, seed=made.seed, p2p=p2p,
                                ddim_steps=made.ddim_steps)  # fmt: skip
        edited = edit_inversion(self.model, inversion, target_prompt, guidance=settings.guidance, tau=settings.tau,
                                settings=settings.sampling, p2p=settings.p2p, unguided=unguided)  # fmt: skip
        return ICDEditOutput([edited], settings, [settings.seed])


def _one_dtype(torch_dtype: Any, dtype: Any) -> Any:
    if torch_dtype is not None and dtype is not None and _dtype(torch_dtype) != _dtype(dtype):
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree: give one")
    return dtype if torch_dtype is None else torch_dtype


def _named_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a name gives (`float16`, `torch.bfloat16`), None for a name of none (`cuda`)."""
    import torch

    found = getattr(torch, name.removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else None


def _dtype(value: Any) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; None for None."""
    if value is None:
        return None
    import torch

    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise TypeError(f"a dtype is a torch.dtype or its name, not {type(value).__name__}")
    found = _named_dtype(value)
    if found is None:
        raise ValueError(f"{value!r} names no torch dtype: use float32, float16 or bfloat16")
    return found


def _per_image(prompt: str | Sequence[str], count: int, label: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * count
    prompts = list(prompt)
    if len(prompts) != count:
        raise ValueError(f"{label} holds {len(prompts)} prompts for {count} images: give one, or one per image")
    return prompts


def _generator_seeds(generator: Any, count: int) -> list[int] | None:
    """Each image's seed from a generator (the same for all) or a list of them (one per image)."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} images: give one, or one per image")
        return [int(one.initial_seed()) for one in generator]
    return [int(generator.initial_seed())] * count


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]
