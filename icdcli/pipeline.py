"""A diffusers-style Python entry point: load once, call with images and prompts.

    from icdcli import ICDEditPipeline

    pipe = ICDEditPipeline.from_pretrained("sd15", torch_dtype=torch.float16).to("cuda")
    edited = pipe(Image.open("cat.jpg"), "a cat", "a dog", generator=torch.Generator().manual_seed(30))[0]

Defaults, methods and backends are the command line's: the model's edit recipe under whatever the
call gives, the same P2P settings, the same image fitting, and a list of images is edited in batches
through `icdcli.editing.edits.edit_batch`, as `icd edit` edits several; `icd edit` and this class give the same
pixels for the same settings. What diffusers users reach for is here too: `torch_dtype`, `.to()`,
`.device` / `.dtype`, `generator`, `callback_on_step_end`, `set_progress_bar_config`, `from_pipe`, and an
output that indexes like a list of images. `edit_many` edits files as `icd edit` does, outputs and records
included, through its runner.

The work is done below this class: in-memory batches in `icdcli.run.in_memory`, files in `icdcli.run.files`,
models over a diffusers pipeline in `icdcli.models.from_pipe`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from PIL import Image

from icdcli.diffusion.recipe import EditRequest, P2POptions, ResolvedEdit, resolve_edit
from icdcli.run.in_memory import CALLBACK_TENSOR_INPUTS, StepEndCallback

if TYPE_CHECKING:
    import torch

    from icdcli.editing.inversion import Inversion
    from icdcli.models.api import EditModel
    from icdcli.run.files import EditedFiles

__all__ = ["CALLBACK_TENSOR_INPUTS", "ICDEditOutput", "ICDEditPipeline", "PipelineBase", "StepEndCallback"]

_Pipeline = TypeVar("_Pipeline", bound="PipelineBase")


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


class PipelineBase:
    """What a diffusers pipeline has beside its calls (as `DiffusionPipeline` has it): the device and dtype the model
    runs in, `to()`, and the progress bar of a call."""

    def __init__(self, model: EditModel, backend: str = "torch") -> None:
        self.model = model
        self.backend = backend
        self._progress_bar_config: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        """The device the networks run on."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNets' and text encoders' dtype (the VAE's may differ: `model.vae_dtype`)."""
        return self.model.dtype

    def to(
        self: _Pipeline, *args: Any, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> _Pipeline:
        """Move the model, as diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`
        or `pipe.to(device=..., dtype=...)` do, and return this pipeline.

        What is not given stays: a device alone keeps the dtype, a dtype alone the device. The VAE's dtype follows
        the device, as on the command line (float32, or on CUDA float16 for SD1.5 and bfloat16 for SDXL). A model on
        ONNX Runtime or TensorRT cannot move (its sessions are bound to a device): load it where it should run.
        """
        from icdcli.core.quiet import libraries_quieted
        from icdcli.models.runtime import resolve_device

        device, dtype = _placement(args, device, dtype)
        target = self.device if device is None else resolve_device(str(device))
        move = getattr(self.model, "to", None)  # an ICDModel's; an accelerated model's says why it cannot
        if move is None:
            from icdcli.core.errors import ICDError

            raise ICDError(f"a model on {self.backend} cannot move: load it where it should run")
        with libraries_quieted():
            move(target, _dtype(dtype) or self.dtype)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options of the tqdm bar a call draws over its decode steps (`disable=True` turns it off, `file=`,
        `desc=`, `leave=` ...), replacing those set before. By default the bar is drawn on stderr when stderr is a
        terminal and not otherwise (tqdm's `disable=None`); `disable=False` draws it anywhere."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, total: int) -> Any:
        """A tqdm bar of `total` steps under this pipeline's configuration."""
        from tqdm.auto import tqdm

        return tqdm(total=total, **{"disable": None, "desc": "decoding", **self._progress_bar_config})


class ICDEditPipeline(PipelineBase):
    """An iCD model ready to edit; `from_pretrained` (or `from_pipe`) loads it, calling it edits."""

    def __init__(self, model: EditModel, backend: str = "torch", label: str | None = None) -> None:
        """`label`: the model's name in the records `edit_many` writes (`model`); default: its metadata's name."""
        super().__init__(model, backend)
        self.label = model.info.name if label is None else label

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
            model: a preset (`sd15`, `sdxl`, ...), a model or release folder, a hub id; None: the embedded model.
            base, teacher, forward_lora, reverse_lora: parts by local path, as the flags of the same names.
            device: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.
            torch_dtype: the UNets' and text encoders' dtype (`torch.float16`, or its name); None: float16 on CUDA,
                float32 elsewhere. The VAE's follows the device, as on the command line.
            dtype: an older name of `torch_dtype`. backend: `torch`, `onnxruntime`, `tensorrt` or `auto`.
        """
        from icdcli.run.model import load_pretrained

        chosen = _dtype(_one_dtype(torch_dtype, dtype))
        loaded = load_pretrained(model, base=base, teacher=teacher, forward_lora=forward_lora,
                                 reverse_lora=reverse_lora, device=device, dtype=chosen, backend=backend)  # fmt: skip
        return cls(loaded.model, loaded.backend, loaded.label)

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
        reverse UNets are new: each LoRA (the released PEFT files) fused into a copy of the teacher UNet, as `icd`
        fuses released files, in the pipeline UNet's dtype and on its device; the teacher is the state dict
        `teacher`, or None: the pipeline's UNet. The edit recipe is the family's release recipe. The arguments:
        `icdcli.models.from_pipe.model_from_pipe`.
        """
        from icdcli.models.from_pipe import model_from_pipe

        model = model_from_pipe(pipeline, forward_lora=forward_lora, reverse_lora=reverse_lora, teacher=teacher,
                                forward_boundaries=forward_boundaries, reverse_boundaries=reverse_boundaries,
                                keep_teacher=keep_teacher, name=name)  # fmt: skip
        return cls(model, "torch")

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
        mask_image: Image.Image | Sequence[Image.Image | None] | None = None,
        batch_size: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
    ) -> ICDEditOutput:
        """Edit `image` (or each of a list) from `source_prompt` to `target_prompt`.

        A list of images is edited in batches of one working size (`icdcli.editing.edits.edit_batch`, as `icd edit`
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
            mask_image: the region that may change, as `icd edit --mask` takes it (white may, black stays the
                image's own pixels), one for all images or one (or None) per image; None: the whole image.
            batch_size: images per network call; None: by device and size, as on the command line.
            callback_on_step_end: called after each decode step as `callback(pipe, step, timestep,
                callback_kwargs)`, `timestep` the one the step started from (999, 779, ... for the 4-step release)
                and `callback_kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs`: `latents`,
                the batch's latents after the step (the target branches' of a P2P edit). It returns a dict; a
                `latents` in it replaces them (same shape). With several batches, each runs its own steps.
            callback_on_step_end_tensor_inputs: which tensors the callback gets: `latents`.
        """
        from icdcli.run.in_memory import StepEnd, edit_images, image_seeds, per_image, per_image_mask

        step_end = StepEnd(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        step_end.names()  # a callback asking for what it cannot have fails before any work
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images:
            raise ValueError("no image to edit")
        sources = per_image(source_prompt, len(images), "source_prompt")
        targets = per_image(target_prompt, len(images), "target_prompt")
        seeds = image_seeds(generator, seed, len(images))
        first = seed if seeds is None else seeds[0]
        settings = _resolve(self.model, sampler, method, first, ddim_steps, guidance=guidance, tau=tau, p2p=p2p)
        seeds = seeds or [settings.seed] * len(images)
        edited = edit_images(self.model, images, sources, targets, settings, seeds=seeds, unguided=unguided,
                             batch_size=batch_size, progress_bar=self.progress_bar, step_end=step_end,
                             masks=per_image_mask(mask_image, len(images)))  # fmt: skip
        return ICDEditOutput(edited, settings, seeds)

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
        (`icdcli.editing.inversion.invert_for_edit`).

        Args:
            image: a PIL image, any size.
            prompt: the source prompt.
            seed, generator: the seed of the noise added before inversion, as a call takes them; None: the recipe's.
            sampler: `icd`, or `ddim` for the teacher's DDIM inversion (`ddim_steps`).
        """
        from icdcli.editing.inversion import invert_for_edit
        from icdcli.io.images import photo_rgb
        from icdcli.run.in_memory import image_seeds

        seeds = image_seeds(generator, seed, 1)
        settings = _resolve(self.model, sampler, "swap", seed if seeds is None else seeds[0], ddim_steps)
        return invert_for_edit(self.model, photo_rgb(image), prompt, settings.sampling)

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
        mask_image: Image.Image | None = None,
    ) -> ICDEditOutput:
        """Edit an inversion (`invert`) to `target_prompt`: the decode alone, the pixels a whole call with the same
        settings gives (`icdcli.editing.inversion.edit_inversion`). The sampler and seed are the inversion's.

        Args:
            inversion: what `invert` returned, from this pipeline's model.
            target_prompt: what the edited image should show.
            method, guidance, tau, p2p, mask_image: as a call takes them; None: the recipe's (no mask: all of it).
            unguided: prompt swap: the prompt of the unguided steps, `source` (preserves more) or `target`.
        """
        from icdcli.editing.inversion import edit_inversion
        from icdcli.io.images import photo_mask

        made = inversion.settings
        settings = _resolve(self.model, made.sampler, method, made.seed, made.ddim_steps, guidance=guidance, tau=tau,
                            p2p=p2p)  # fmt: skip
        mask = None if mask_image is None else photo_mask(mask_image, inversion.original_size, label="mask_image")
        edited = edit_inversion(self.model, inversion, target_prompt, guidance=settings.guidance, tau=settings.tau,
                                settings=settings.sampling, p2p=settings.p2p, unguided=unguided, mask=mask)  # fmt: skip
        return ICDEditOutput([edited], settings, [settings.seed])

    def edit_many(
        self,
        images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        *,
        spec: str | os.PathLike[str] | None = None,
        output: str | os.PathLike[str] | None = None,
        recursive: bool = False,
        overwrite: bool = False,
        method: str = "auto",
        guidance: float | None = None,
        tau: float | None = None,
        seed: int | None = None,
        sampler: str = "icd",
        ddim_steps: int = 50,
        p2p: P2POptions | None = None,
        unguided: str = "source",
        mask: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        notify: Callable[[str], None] | None = None,
        output_format: str = "png",
        quality: int | None = None,
    ) -> EditedFiles:
        """Edit image files as `icd edit IMAGE... [--spec SPEC] [-o OUTPUT]` does with the same settings, through its
        runner (`icdcli.run.files.edit_files`): the same outputs, pixels and records, so that either finds the
        other's outputs made (a rerun skips them) and claims keep concurrent runs apart.

        Args:
            images: image files, or folders of them (`recursive`: their subfolders too).
            source_prompt, target_prompt: the prompts of every image, and of spec rows that give none.
            spec: a .jsonl or .csv file, one edit per row (`icd edit --spec`).
            output: a file for one input, else a folder; None: `NAME-edit.png` beside each input.
            overwrite: replace existing outputs (else one made with the same settings is skipped, another refused).
            method, guidance, tau, seed, sampler, ddim_steps, p2p, unguided, batch_size: as a call takes them.
            mask: a mask file every image is held to, as `icd edit --mask` (a spec row's own `mask` wins).
            notify: hears the lines `icd edit` prints (notes, what was written); default: the `icd` logger's INFO.
            output_format, quality: `png`, `jpg` or `webp` and the lossy ones' quality, as `--format`, `--quality`.

        Returns each item's outcome (with the record `icd edit --json` prints) and the counts: a failed item fails
        alone. Ctrl-C stops after the current batch, then raises KeyboardInterrupt.
        """
        from icdcli.run.files import edit_files
        from icdcli.run.model import Loaded
        from icdcli.run.report import Reporter

        request = EditRequest(method, guidance, tau, seed, sampler, ddim_steps, p2p or P2POptions())
        return edit_files(Loaded(self.model, self.label, 0.0, self.backend), images, source_prompt, target_prompt,
                          request=request, unguided=unguided, spec=spec, output=output, recursive=recursive,
                          overwrite=overwrite, batch_size=batch_size, mask=mask, output_format=output_format,
                          quality=quality, reporter=Reporter() if notify is None else Reporter(say=notify))  # fmt: skip


def _resolve(
    model: EditModel, sampler: str, method: str, seed: int | None, ddim_steps: int, **given: Any
) -> ResolvedEdit:
    """The settings of an edit: `given` (guidance, tau, p2p; None: the recipe's) over the model's recipe."""
    info = model.info
    return resolve_edit(info.edit, info.generate_guidance, sampler=sampler, method=method, seed=seed,
                        ddim_steps=ddim_steps, **given)  # fmt: skip


def _placement(args: tuple[Any, ...], device: Any, dtype: Any) -> tuple[Any, Any]:
    """The device and dtype of `to(*args, device=..., dtype=...)`: each positional one a device or a dtype (or its
    name)."""
    import torch

    for arg in args:
        if isinstance(arg, torch.dtype) or (isinstance(arg, str) and _named_dtype(arg) is not None):
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            device = arg
        else:
            raise TypeError(f"to() takes a device and/or a dtype, not {type(arg).__name__}")
    return device, dtype


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
