"""A diffusers-style Python entry point: load once, call with images and prompts.

    from icdcli.pipeline import ICDEditPipeline

    pipe = ICDEditPipeline.from_pretrained("sd15")              # a preset, folder, hub id, or None: embedded
    edited = pipe(Image.open("cat.jpg"), "a cat", "a dog").images[0]

Defaults, methods and backends are the command line's: the model's edit recipe under whatever the
call gives, the same P2P settings, the same image fitting; `icd edit` and this class give the same
pixels for the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from .recipe import P2POptions, ResolvedEdit, resolve_edit

if TYPE_CHECKING:
    from .model_api import EditModel


@dataclass
class ICDEditOutput:
    """What a call returns: one edited image per input, at the input's own size, and the settings used."""

    images: list[Image.Image]
    settings: ResolvedEdit


class ICDEditPipeline:
    """An iCD model ready to edit; `from_pretrained` loads it, calling it edits."""

    def __init__(self, model: EditModel, backend: str = "torch") -> None:
        self.model = model
        self.backend = backend

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
        dtype: Any = None,
        backend: str = "torch",
    ) -> ICDEditPipeline:
        """Load a model as `icd edit --model ...` does.

        Args:
            model: a preset name (`sd15`, `sdxl`, ...), a model or release folder, a hub id, or None for the
                embedded model.
            base, teacher, forward_lora, reverse_lora: parts by local path, as the flags of the same names.
            device: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.
            dtype: a torch dtype; None: float16 on CUDA, float32 elsewhere.
            backend: `torch`, `onnxruntime`, `tensorrt` or `auto` (the fastest present).
        """
        import torch

        from .models import resolve_device
        from .sources import ModelRequest, load_requested_model

        target = resolve_device(device)
        half = dtype == torch.float16 or (dtype is None and target.type == "cuda")
        loaded = load_requested_model(ModelRequest(model, base, teacher, forward_lora, reverse_lora, half=half))
        loaded.to(target, dtype)
        if backend == "torch":
            return cls(loaded, backend)
        from .accelerated import accelerate, select_backend

        backend = select_backend(backend, device=loaded.device)
        return cls(accelerate(loaded, backend), backend)

    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        source_prompt: str,
        target_prompt: str,
        *,
        method: str = "auto",
        guidance: float | None = None,
        tau: float | None = None,
        seed: int | None = None,
        sampler: str = "icd",
        ddim_steps: int = 50,
        p2p: P2POptions | None = None,
    ) -> ICDEditOutput:
        """Edit `image` (or each of a list) from `source_prompt` to `target_prompt`.

        Args:
            image: a PIL image or a list of them; any size (fitted to the model's area, returned at its own).
            source_prompt: what the image shows; target_prompt: what it should show.
            method: `auto` (the model's recipe), `p2p` or `swap`.
            guidance, tau, seed: None for the model's recipe.
            sampler: `icd`, or `ddim` for the 50-step teacher baseline (`ddim_steps`).
            p2p: Prompt-to-Prompt values (step fractions, blend and amplify words); None: the recipe's.
        """
        from .editing import SamplerSettings, edit

        info = self.model.info
        settings = resolve_edit(info.edit, info.generate_guidance, sampler=sampler, method=method, guidance=guidance,
                                tau=tau, seed=seed, p2p=p2p)  # fmt: skip
        sampling = SamplerSettings(sampler, ddim_steps, settings.seed)
        images = [image] if isinstance(image, Image.Image) else list(image)
        edited = []
        for picture in images:
            result = edit(self.model, picture.convert("RGB"), source_prompt, target_prompt, guidance=settings.guidance,
                          tau=settings.tau, settings=sampling, p2p=settings.p2p)  # fmt: skip
            edited.append(
                result if result.size == picture.size else result.resize(picture.size, Image.Resampling.LANCZOS)
            )
        return ICDEditOutput(edited, settings)
