"""Run a loaded `ICDModel` on ONNX Runtime, TensorRT or (opt-in, on the CPU) OpenVINO: backend choice, export on
first use, the wrapper.

`AcceleratedModel` replaces the denoisers, prompt encoding and VAE of a model with backend-run versions and
delegates everything else, so the edits of `icdcli.editing` (`edit`, `invert`, `generate`) run on it unchanged:

    backend = select_backend("auto", model.device)
    model = accelerate(model, backend, progress=say)
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icdcli.core.errors import ICDError
from icdcli.diffusion.denoiser import (
    Conditioning,
    ControlledDenoiser,
    ControlledEps,
    Denoiser,
    Guidance,
    PromptEmbedding,
)
from icdcli.models.api import EditModel, prompt_conditioning
from icdcli.models.info import ModelInfo
from icdcli.models.runtime import ICDModel, warn_if_truncated

if TYPE_CHECKING:
    from icdcli.diffusion.p2p.control import StepControl

logger = logging.getLogger("icd")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")


# --- backend choice ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendFacts:
    """What this process can run, probed once; `choose_backend` is a pure function of it."""

    cuda: bool
    tensorrt: bool
    onnxruntime: bool
    onnxruntime_cuda: bool
    onnx: bool
    openvino: bool = False
    cpu_bf16: bool = False
    """The model runs on the CPU, and the CPU has bf16 matrix instructions (`icdcli.core.cpu.cpu_has_bf16`)."""


def probe_backends(device: torch.device | str | None = None) -> BackendFacts:
    """Importability of each backend (without importing TensorRT), whether `device` is a CUDA GPU, and whether it is
    a CPU with bf16 matrix instructions."""
    from icdcli.core import cpu
    from icdcli.engines import onnxruntime as ort_engine

    device = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    on_cpu = device.type == "cpu" if device is not None else not cuda
    modules = ("tensorrt", "onnxruntime", "onnx", "openvino")
    found = {name: importlib.util.find_spec(name) is not None for name in modules}
    return BackendFacts(
        cuda=cuda,
        tensorrt=found["tensorrt"],
        onnxruntime=found["onnxruntime"],
        onnxruntime_cuda=found["onnxruntime"] and cuda and ort_engine.has_cuda_provider(),
        onnx=found["onnx"],
        openvino=found["openvino"],
        cpu_bf16=on_cpu and cpu.cpu_has_bf16() is True,
    )


def backend_problem(name: str, facts: BackendFacts) -> str | None:
    """Why backend `name` cannot run here, with what to install or change; None when it can."""
    if name == "torch":
        return None
    if name == "onnxruntime":
        if not (facts.onnxruntime and facts.onnx):
            gpu = " (or onnxruntime-gpu on a CUDA machine)" if facts.cuda else ""
            return f"--backend onnxruntime needs onnxruntime and onnx: pip install 'icd[onnx]'{gpu}"
        return None
    if name == "openvino":
        if facts.cuda:
            return "--backend openvino runs on the CPU only: use --device cpu, or another backend on the GPU"
        if not (facts.openvino and facts.onnx):
            return "--backend openvino needs openvino and onnx: pip install 'icd[openvino]'"
        return None
    if name == "tensorrt":
        if not facts.cuda:
            return "--backend tensorrt needs an NVIDIA GPU that torch sees (--device cuda): use --backend onnxruntime"
        if not (facts.tensorrt and facts.onnx):
            return "--backend tensorrt needs TensorRT 10.x–11.x and onnx: pip install 'icd[tensorrt]'"
        return None
    raise ICDError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def choose_backend(name: str, facts: BackendFacts) -> str:
    """The backend to run: `name` itself if it can run (else ICDError), or for "auto" the fastest present.

    auto: TensorRT on a CUDA device when importable; else onnxruntime (on CUDA only with its CUDA provider,
    since a CPU session would be slower than torch on the GPU); else torch. Never OpenVINO: measured at SD1.5 size
    (issue #30), its fp32 is not faster than ONNX Runtime's by a clear margin and its bf16 fails the 3/255 parity
    bound, so it stays opt-in. The precision, and the CPU rule that picks PyTorch bf16, are `choose_run`'s.
    """
    if name != "auto":
        problem = backend_problem(name, facts)
        if problem:
            raise ICDError(problem)
        return name
    if facts.cuda:
        if backend_problem("tensorrt", facts) is None:
            return "tensorrt"
        return "onnxruntime" if facts.onnxruntime_cuda and facts.onnx else "torch"
    return "onnxruntime" if backend_problem("onnxruntime", facts) is None else "torch"


def select_backend(name: str = "auto", *, device: torch.device | str | None = None) -> str:
    """The backend that will run for auto, tensorrt, onnxruntime, openvino or torch; ICDError if a named one cannot."""
    return choose_backend(name, probe_backends(device))


ENGINE_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT", "openvino": "OpenVINO"}


@dataclass(frozen=True)
class RunChoice:
    """The backend and precision a run gets (`choose_run`), and why, when auto chose them."""

    backend: str
    precision: str
    """`auto` (the device's default: fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."""
    reason: str | None = None

    def line(self) -> str:
        """What the command line says of an auto choice: `backend: onnxruntime (auto)`, or with the rule that chose
        the precision too, `backend: torch bf16 (auto: ...)`."""
        if self.reason is None:
            return f"backend: {self.backend} (auto)"
        return f"backend: {self.backend} {self.precision} (auto: {self.reason})"


def choose_run(backend: str, precision: str, facts: BackendFacts, *, sd_size: bool | None) -> RunChoice:
    """The backend and precision to run for `--backend` and `--precision` as given (`choose_backend` for the backend).

    One rule beyond `choose_backend` (issue #30): `--backend auto` with `--precision auto` runs an SD-size model
    (`sd_size`: `icdcli.models.size_class`; None, unknown, does not count) on PyTorch bf16 on a CPU with bf16 matrix
    instructions (`facts.cpu_bf16`), where it edits 2.4x faster than ONNX Runtime fp32 within 3/255. Anything named
    keeps its meaning (`--precision fp32` keeps auto's backend of before), and CUDA devices are untouched.
    """
    if backend == "auto" and precision == "auto" and facts.cpu_bf16 and not facts.cuda and sd_size is True:
        instead = ENGINE_NAMES[choose_backend("auto", facts)]
        why = f"SD-size model, this CPU has bf16 matrix instructions; --precision fp32 for {instead} fp32"
        return RunChoice("torch", "bf16", why)
    return RunChoice(choose_backend(backend, facts), precision)


def select_run(
    backend: str, precision: str, *, device: torch.device | str | None = None, sd_size: bool | None = None
) -> RunChoice:
    """`choose_run` on this machine's facts (`probe_backends`) for `device`; ICDError if a named backend cannot run."""
    return choose_run(backend, precision, probe_backends(device), sd_size=sd_size)


# --- export on first use ----------------------------------------------------------------------------------


def default_precision(model: ICDModel) -> str:
    return "fp16" if model.device.type == "cuda" and model.dtype == torch.float16 else "fp32"


def lock_path(folder: Path) -> Path:
    """A lock file in the cache for an export folder, so no lock file is left beside a user's --out folder."""
    from icdcli.core.digests import text_sha256
    from icdcli.core.paths import cache_root

    digest = text_sha256(str(folder.resolve()))[:24]
    return cache_root() / "locks" / f"{digest}.lock"


def check_export_space(model: ICDModel, folder: Path, precision: str, *, p2p: bool | None = None) -> None:
    """NotEnoughSpace (an OSError of a full disk) when the disk of `folder` has less free than an export of `model`
    takes (`icdcli.export.onnx.estimated_bytes`): said before minutes of tracing, not after. The folder's own old
    export, which the new one replaces only at the end, counts as taken."""
    from icdcli.core.errors import NotEnoughSpace
    from icdcli.core.paths import free_bytes
    from icdcli.export.onnx import estimated_bytes

    free = free_bytes(folder)
    if free is None:
        return
    needed = estimated_bytes(model, precision, include_teacher=True, p2p=p2p)
    if free < needed:
        raise NotEnoughSpace("the ONNX export", folder, needed, free)


def ensure_exported(
    model: ICDModel,
    *,
    precision: str | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    p2p: bool | None = None,
    fp32_norm: bool | None = None,
    for_tensorrt: bool = False,
) -> tuple[Path, Any]:
    """The model's ONNX export folder and manifest, exporting it first when missing or stale.

    `p2p`: whether a new export holds the reverse Prompt-to-Prompt graph (default: for SD1.5-family
    models; see `icdcli.export.onnx.plan_graphs`). `fp32_norm`: whether an fp16 export keeps its normalisation
    layers and the P2P softmax in fp32 (None: an existing export of either kind serves, so an explicit
    `--no-fp32-norm` export is kept; a new one follows `DEFAULT_FP32_NORM`, fp32). `for_tensorrt`:
    an export whose graphs were not constant-folded is made again where polygraphy or onnx-graphsurgeon can fold.

    A file lock keeps two processes from exporting the same model at once; the second one waits and
    then finds the first one's export.

    Args:
        model: The PyTorch model to export.
        precision: `fp32` or `fp16`; None: the model's default (`default_precision`).
        out_dir: The export folder; None: the cache's folder for this model and precision.
        force: Export again even when an up-to-date export is there.
        progress: Called with a line per step.
        p2p: See above.
        fp32_norm: See above.
        for_tensorrt: See above.
    """
    from icdcli.core.paths import mark_cached_used
    from icdcli.export import DEFAULT_OPSET, default_export_dir, export_model, read_manifest, stale_reason
    from icdcli.export.cleanup import sanitizer_available
    from icdcli.export.files import file_lock
    from icdcli.export.manifest import EXPORT_FORMAT, TEACHER_MISSING, model_fingerprint

    precision = precision or default_precision(model)
    folder = Path(out_dir) if out_dir is not None else default_export_dir(model, precision)
    fingerprint = model_fingerprint(model)
    need_teacher = model.teacher_unet is not None
    with file_lock(lock_path(folder)):
        manifest = None if force else read_manifest(folder)
        reason = (
            "forced"
            if force
            else stale_reason(manifest, fingerprint, precision, DEFAULT_OPSET, need_teacher=need_teacher)
        )
        same_norm = manifest is not None and fp32_norm in (None, manifest.fp32_norm)
        if reason == TEACHER_MISSING and same_norm:
            # everything else is current: export the teacher beside the other graphs, not all of them again
            from icdcli.export.manifest import TEACHER
            from icdcli.export.onnx import add_graphs

            assert manifest is not None, "a missing teacher is the reason of an existing export"
            manifest = add_graphs(model, folder, manifest, names=[TEACHER], progress=progress)
            reason = None
        if reason is None and (fp32_norm is not None or for_tensorrt):
            need_sanitized = for_tensorrt and sanitizer_available()
            reason = stale_reason(
                manifest, fingerprint, precision, DEFAULT_OPSET, fp32_norm=fp32_norm, need_sanitized=need_sanitized
            )
        if reason is not None:
            if fp32_norm is None and manifest is not None and manifest.export_format == EXPORT_FORMAT:
                fp32_norm = manifest.fp32_norm  # exported again for another reason: the norms as they were chosen
            why = "first use" if reason == "no export yet" else reason
            check_export_space(model, folder, precision, p2p=p2p)
            logger.info("exporting %s to ONNX (%s) in %s", model.info.name, why, folder)
            # constants are folded for TensorRT only: ONNX Runtime folds at load, and folding a graph over 2 GB holds
            # its weights in memory twice or more (a later TensorRT run exports again, folded)
            export_model(
                model, folder, precision=precision, opset=DEFAULT_OPSET, include_teacher=True, progress=progress,
                p2p=p2p, fp32_norm=fp32_norm, sanitize=None if for_tensorrt else False,
            )  # fmt: skip
            manifest = read_manifest(folder)
    mark_cached_used(folder)  # `icd cache prune` goes by last use
    return folder, manifest


# --- the wrapper ------------------------------------------------------------------------------------------


class AcceleratedModel:
    """An `EditModel` whose denoisers, text encoders and VAE run on a backend, composed over the `ICDModel` that
    supplies the metadata, the tokenizers and the PyTorch modules its graphs fall back to (or over a
    `icdcli.backends.graph_model.DeferredTorchModel`, which loads that `ICDModel` only when something needs it)."""

    def __init__(self, model: EditModel, parts: Any):
        self.model = model
        self.parts = parts
        self.backend: str = parts.name
        self.told: set[str] = set()
        self.low_memory = model.low_memory

    def fallback_notes(self) -> dict[str, str]:
        """Graph name -> why that graph runs on PyTorch (or the next backend) for the rest of the run: an engine
        that failed to build or load, or that was dropped after a failure at run time (`BackendParts.fallback_notes`).
        Each was said once, as a warning, when it happened."""
        notes = getattr(self.parts, "fallback_notes", None)
        return dict(notes()) if notes is not None else {}

    def _or_torch(self, run: Callable[[], Any], torch_run: Callable[[], Any], what: str) -> Any:
        """`run()` on the backend; where that graph cannot run there (BackendUnavailable), `torch_run()` with a note."""
        from icdcli.engines.base import BackendUnavailable

        try:
            return run()
        except BackendUnavailable as error:
            if what not in self.told:
                self.told.add(what)
                logger.warning("%s: the %s runs on PyTorch", error, what)
            return torch_run()

    # --- what the wrapped model supplies unchanged ---

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def tokenizers(self) -> list[Any]:
        return self.model.tokenizers

    @property
    def vae_scale_factor(self) -> int:
        return self.model.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    @property
    def teacher_unet(self) -> torch.nn.Module | None:
        return self.model.teacher_unet

    @property
    def source(self) -> str:
        return self.model.source

    def prompt_token_count(self, text: str) -> tuple[int, int]:
        return self.model.prompt_token_count(text)

    def needs_negative(self, guidance: float) -> bool:
        return self.model.needs_negative(guidance)

    @property
    def low_memory(self) -> bool:
        return self.model.low_memory

    @low_memory.setter
    def low_memory(self, value: bool) -> None:
        self.model.low_memory = value
        for denoiser in (self.parts.forward, self.parts.reverse, self.parts.teacher):
            if hasattr(denoiser, "exclusive"):
                denoiser.exclusive = value

    def release(self, role: str) -> None:
        """Free the `role` UNet's graphs until their next use (ONNX Runtime closes their sessions)."""
        denoiser = {"forward": self.parts.forward, "reverse": self.parts.reverse, "teacher": self.parts.teacher}[role]
        release = getattr(denoiser, "release", None)
        if release is not None:
            release()

    def to(self, *args: Any, **kwargs: Any) -> AcceleratedModel:
        raise ICDError("move the model with .to() before accelerating it: backend sessions are bound to a device")

    @property
    def forward_denoiser(self) -> Denoiser:
        return self.parts.forward

    @property
    def reverse_denoiser(self) -> Denoiser:
        return self.parts.reverse

    @property
    def teacher_denoiser(self) -> Denoiser:
        return self.parts.teacher if self.parts.teacher is not None else self.model.teacher_denoiser

    def encode_prompt(self, text: str | list[str]) -> PromptEmbedding:
        """Encode one prompt, or a list of prompts as one batch through the text graphs."""
        from icdcli.engines.base import encode_ids

        for prompt in [text] if isinstance(text, str) else text:
            warn_if_truncated(self.model, prompt)
        ids = [
            tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.model.device)
            for tokenizer in self.model.tokenizers
        ]
        return self._or_torch(
            lambda: encode_ids(self.parts.text_encoders, ids), lambda: self.model.encode_prompt(text), "text encoder"
        )

    def conditioning(
        self, prompt: str | list[str], height: int, width: int, with_negative: bool = False
    ) -> Conditioning:
        """As `ICDModel.conditioning`, with prompts encoded by the backend's text graphs."""
        return prompt_conditioning(self, prompt, height, width, with_negative)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> clean latents (posterior mean times scaling factor, inside the graph)."""
        feeds = {"images": pixels.to(self.model.device, torch.float32)}
        return self._or_torch(
            lambda: self.parts.vae_encoder(feeds)["latents"], lambda: self.model.encode_image(pixels), "VAE encoder"
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> pixels in [-1, 1]."""
        feeds = {"latents": latents.to(self.model.device, torch.float32)}
        return self._or_torch(
            lambda: self.parts.vae_decoder(feeds)["images"], lambda: self.model.decode_latents(latents), "VAE decoder"
        )


class OffloadingFallback:
    """A torch denoiser whose UNet leaves the GPU once the graph in front of it runs (`release`), so the GPU does not
    hold the weights twice; the first time it is needed after all (attention control without a P2P graph, a shape
    outside the engine's profiles) it moves back and stays."""

    def __init__(self, denoiser: ControlledDenoiser, unet: torch.nn.Module, device: torch.device, name: str):
        self.denoiser, self.unet, self.device, self.name = denoiser, unet, device, name
        self.released = self.needed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["denoiser"], name)

    def release(self) -> None:
        if self.released or self.needed or self.device.type != "cuda":
            return
        self.unet.to("cpu")
        self.released = True
        torch.cuda.empty_cache()
        logger.info("the PyTorch %s left the GPU: its graph runs", self.name)

    def _needed(self) -> ControlledDenoiser:
        self.needed = True
        if self.released:
            logger.info("the PyTorch %s returns to the GPU for steps its graph cannot run", self.name)
            self.unet.to(self.device)
            self.released = False
        return self.denoiser

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        return self._needed()(x, t, cond, guidance)

    def install_control(self) -> None:
        self.denoiser.install_control()  # processors hold no weights: installing them moves nothing

    def controlled(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        return self._needed().controlled(x, t, cond, guidance, control)


def torch_fallbacks(model: ICDModel, *, offload: bool = False) -> dict[str, ControlledDenoiser]:
    """The torch denoisers the graphs hand attention control (and uncovered shapes) to; with `offload`, each UNet
    leaves the GPU once its graph has run (only for a model that nothing else runs on PyTorch meanwhile)."""
    roles: dict[str, tuple[ControlledDenoiser, torch.nn.Module]] = {
        "forward_unet": (model.forward_denoiser, model.forward_unet)
    }
    roles["reverse_unet"] = (model.reverse_denoiser, model.reverse_unet)
    if model.teacher_unet is not None:
        roles["teacher_unet"] = (model.teacher_denoiser, model.teacher_unet)
    if not offload:
        return {role: denoiser for role, (denoiser, _) in roles.items()}
    return {role: OffloadingFallback(d, unet, model.device, role) for role, (d, unet) in roles.items()}


def accelerate(
    model: ICDModel,
    backend: str,
    *,
    progress: Callable[[str], None] | None = None,
    export_dir: str | Path | None = None,
    offload_torch: bool = False,
    **tensorrt_options: Any,
) -> ICDModel | AcceleratedModel:
    """`model` on `backend` (as returned by `select_backend`); torch returns the model itself.

    Exports to ONNX on first use, and for TensorRT builds each engine when its graph first runs (both cached).

    Args:
        model: The PyTorch model.
        backend: `torch`, `onnxruntime`, `tensorrt` or `openvino` (on the CPU; bf16 for a bfloat16 model, else fp32).
        progress: Called with a line per export or build step.
        export_dir: The ONNX export folder; None: the cache.
        offload_torch: Move each PyTorch UNet off the GPU once its graph runs (see `OffloadingFallback`); only
            for a model that is not also run on PyTorch directly.
        **tensorrt_options: Passed to the TensorRT `load_parts` (height, width, max_batch, cuda_graph, build_now,
            profiles: `native-first` by default, one profile at the working size built first).
    """
    if backend == "torch":
        return model
    if backend == "onnxruntime":
        from icdcli.engines import onnxruntime as ort_engine

        folder, manifest = ensure_exported(model, out_dir=export_dir, progress=progress)
        fallbacks = torch_fallbacks(model, offload=offload_torch)
        return AcceleratedModel(
            model, ort_engine.load_parts(folder, manifest, device=model.device, fallbacks=fallbacks)
        )
    if backend == "openvino":
        from icdcli.engines import openvino as ov_engine

        ov_engine.check_device(model.device)  # before an export it could not run
        folder, manifest = ensure_exported(model, precision="fp32", out_dir=export_dir, progress=progress)
        fallbacks = torch_fallbacks(model, offload=offload_torch)
        precision = ov_engine.precision_for(model.dtype)
        parts = ov_engine.load_parts(folder, manifest, device=model.device, precision=precision, fallbacks=fallbacks)
        return AcceleratedModel(model, parts)
    if backend == "tensorrt":
        from icdcli.engines import tensorrt as trt_engine

        folder, manifest = ensure_exported(model, out_dir=export_dir, progress=progress, for_tensorrt=True)
        fallbacks = torch_fallbacks(model, offload=offload_torch)
        parts = trt_engine.load_parts(
            folder, manifest, model, fallbacks=fallbacks, progress=progress, **tensorrt_options
        )
        return AcceleratedModel(model, parts)
    raise ICDError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
