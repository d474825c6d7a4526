"""The model a run edits with: as loaded (`Loaded`), how a run asks for it (`ModelLoader`), and what its outputs
record of it (`ModelIdentity`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icdcli.models.api import EditModel


@dataclass
class Loaded:
    """A model ready to run, what the user called it, how long loading took, and the backend it runs on."""

    model: EditModel
    label: str
    seconds: float
    backend: str = "torch"


ModelLoader = Callable[[bool], Loaded]
"""Loads the model a run edits with, given whether the teacher is needed too (the DDIM sampler): the command line's
`load_model` over its flags. A run calls it once, when the first item needs the model."""


@dataclass(frozen=True)
class ModelIdentity:
    """What an edit's output records about the model that made it (`icdcli.run.records.edit_record`)."""

    ref: str
    """The model as the user named it; a folder, resolved (records stay valid from another working folder)."""
    hash: str
    backend: str
    precision: str
    num_steps: int
    files: Any = None
    """`icdcli.models.checkpoints.ModelFiles`: what an output's `parameters` chunk names."""

    @classmethod
    def of(cls, loaded: Loaded) -> ModelIdentity:
        from icdcli.models.checkpoints import model_files
        from icdcli.models.identity import model_hash

        model, label = loaded.model, loaded.label
        return cls(
            ref=str(Path(label).resolve()) if Path(label).is_dir() else label,
            hash=model_hash(model),
            backend=loaded.backend,
            precision=str(model.dtype).removeprefix("torch."),
            num_steps=model.info.num_steps,
            files=model_files(model),
        )


def load_pretrained(
    model: str | None,
    *,
    base: str | None = None,
    teacher: str | None = None,
    forward_lora: str | None = None,
    reverse_lora: str | None = None,
    device: str = "auto",
    dtype: Any = None,
    backend: str = "torch",
) -> Loaded:
    """Load a model as `icd edit --model ...` names it, onto `device` in `dtype` (a torch dtype; None: float16 on
    CUDA, float32 elsewhere) and `backend` (`auto`: the fastest present; with `dtype` None on a CPU with bf16 matrix
    instructions, an SD-size model runs on torch bf16, as `icd edit` chooses), without the libraries' warnings and
    bars: what `ICDEditPipeline.from_pretrained` runs."""
    import time

    import torch

    from icdcli.core.quiet import libraries_quieted
    from icdcli.models.runtime import reads_half_cache, resolve_device
    from icdcli.models.sources import ModelRequest, load_requested_model

    start = time.perf_counter()
    target = resolve_device(device)
    request = ModelRequest(model, base, teacher, forward_lora, reverse_lora)
    if backend == "auto" and dtype is None and target.type == "cpu":  # the command line's rule for auto and auto
        from icdcli.backends.accelerated import select_run
        from icdcli.models.size_class import request_is_sd_size

        choice = select_run("auto", "auto", device=target, sd_size=request_is_sd_size(request))
        backend, dtype = choice.backend, torch.bfloat16 if choice.precision == "bf16" else None
    request.half = reads_half_cache(dtype, target)
    with libraries_quieted():
        loaded: Any = load_requested_model(request)
        loaded.to(target, dtype)
    if backend != "torch":
        from icdcli.backends.accelerated import accelerate, select_backend

        backend = select_backend(backend, device=loaded.device)
        loaded = accelerate(loaded, backend)
    return Loaded(loaded, request.label, time.perf_counter() - start, backend)
