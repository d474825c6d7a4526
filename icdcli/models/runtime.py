"""iCD models: text encoders, VAE, forward/reverse (and teacher) UNets, and their metadata.

Sources that load:
- this tool's model folder, `icd.json` beside the components, in one of two layouts:
  `"format": "merged"` (fused UNets in `forward_unet/`, `reverse_unet/`, optional `teacher_unet/`,
  plus `vae/`, `text_encoder/`, `tokenizer/` and for SDXL `text_encoder_2/`, `tokenizer_2/`), or
  `"format": "lora"` (a base pipeline, a teacher state dict and two LoRA files, by relative path);
- a diffusers base pipeline + guidance-distilled teacher state dict + forward/reverse LoRA files in
  the released PEFT layout, fused on load and cached on disk as a merged folder;
- named presets of the released checkpoints (see `presets.py`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from icdcli.backends.torch_speed import Capture, TorchExecution
from icdcli.core.dtypes import vae_precision
from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON, cache_root, mark_used
from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding, UNetDenoiser
from icdcli.diffusion.recipe import SD15, SDXL, EditRecipe, release_recipe
from icdcli.diffusion.schedule import validate_boundaries
from icdcli.io.atomic import atomic_folder
from icdcli.models.api import DiffusersModule, prompt_conditioning
from icdcli.models.identity import made_from, sources_key
from icdcli.models.lora import boundaries_from_filename, fuse_lora, read_lora
from icdcli.models.weights_io import save_unet

logger = logging.getLogger("icd")

FORMAT_VERSION = 1
COND_PROJ_KEY = "time_embedding.cond_proj.weight"


@dataclass
class ModelInfo:
    """What a checkpoint is: its boundaries, guidance mode, latent scaling and defaults."""

    name: str
    family: str
    forward_boundaries: tuple[int, ...]
    reverse_boundaries: tuple[int, ...]
    guidance_distilled: bool
    scaling_factor: float
    native_size: int
    size_multiple: int
    edit: EditRecipe
    generate_guidance: float = 8.0
    made_from: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.forward_boundaries = tuple(int(b) for b in self.forward_boundaries)
        self.reverse_boundaries = tuple(int(b) for b in self.reverse_boundaries)
        validate_boundaries(self.forward_boundaries, self.reverse_boundaries)

    @property
    def num_steps(self) -> int:
        return len(self.reverse_boundaries)

    @property
    def edit_guidance(self) -> float:
        return self.edit.guidance

    @property
    def tau(self) -> float:
        return self.edit.tau

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["forward_boundaries"] = list(self.forward_boundaries)
        data["reverse_boundaries"] = list(self.reverse_boundaries)
        data["edit"] = self.edit.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        """Metadata from `icd.json`. The edit recipe is its `edit` object over the family's release
        recipe; folders written before recipes existed give `edit_guidance` and `tau` at the top."""
        known = {f for f in cls.__dataclass_fields__}
        values = {key: value for key, value in data.items() if key in known}
        fallback = release_recipe(data.get("family", SD15), tuple(data.get("reverse_boundaries", ())))
        try:
            values["edit"] = EditRecipe.from_json(_folder_recipe(data), fallback)
        except (TypeError, ValueError) as error:
            raise ModelSourceError(f"the model's edit recipe is malformed: {error}") from error
        return cls(**values)


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole safetensors file (None if its header and sizes add up); reads only the header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
            if len(head) < 8:
                return "shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, 100_000_000):
                return "its header runs past the end of the file (truncated, or not safetensors)"
            header = json.loads(handle.read(length))
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not safetensors JSON (a different or damaged file)"
    if not isinstance(header, dict):
        return "its header is not safetensors JSON (a different or damaged file)"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items() if key != "__metadata__"]
    if any(not isinstance(end, int) for end in ends) or max(ends, default=0) != size - 8 - length:
        return f"holds {size} bytes where its header describes {8 + length + max(ends, default=0)} (truncated)"
    return None


def check_weights(path: str | Path) -> None:
    """ModelSourceError naming the file and what to do, when a safetensors file is damaged or foreign."""
    problem = safetensors_problem(path)
    if problem is None:
        return
    path = Path(path)
    if cache_root() in path.absolute().parents:
        advice = f"delete the cached folder {path.parent} and run again to make it anew"
    else:
        advice = "download it again, or delete the model folder from icd's cache (icd info shows where) if it is there"
    raise ModelSourceError(f"weights file {path} is damaged: {problem}; {advice}")


def _check_folder_weights(folder: Path) -> None:
    for path in sorted(folder.glob("*/*.safetensors")):
        check_weights(path)


def warn_if_truncated(model: Any, text: str) -> None:
    """Warn once per prompt that the text encoder cuts it, and say after which words."""
    needed, limit = model.prompt_token_count(text)
    warned = model.__dict__.setdefault("_warned_prompts", set())
    if needed <= limit or text in warned:
        return
    warned.add(text)
    tokenizer = model.tokenizers[0]
    ids = tokenizer(text, truncation=True, max_length=limit).input_ids
    kept = tokenizer.decode(ids, skip_special_tokens=True).strip()
    tail = " ".join(kept.split()[-6:])
    logger.warning(
        "prompt is %d tokens, the text encoder takes %d: cut after %r (%d words kept); shorten it: %r",
        needed,
        limit,
        tail,
        len(kept.split()),
        text[:80] + ("..." if len(text) > 80 else ""),
    )


def set_memory_policy(
    model: ICDModel,
    low_memory: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ICDModel:
    """Decide whether `model` frees each UNet between an edit's stages: `low_memory` as given, else by the size of
    the forward and reverse UNets (in `dtype`, default as they are) against the memory of `device` (a CUDA GPU's
    free memory, else this machine's; `icdcli.models.memory`). Decided before `model.to(...)`, a low-memory model
    converts each UNet only when it is next read."""
    from icdcli.models.memory import release_between_stages

    unets = (model.forward_unet, model.reverse_unet)
    width = None if dtype is None else torch.empty((), dtype=dtype).element_size()
    size = sum(p.numel() * (width or p.element_size()) for unet in unets for p in unet.parameters())
    model.low_memory = release_between_stages(size, low_memory, free_gpu=free_gpu_memory(device))
    if model.low_memory:
        logger.info("low memory: each UNet's weights are freed once its stage of an edit is over")
    return model


def free_gpu_memory(device: torch.device | str | None) -> int | None:
    """Free memory of the CUDA GPU `device` names, or None (not a CUDA device, or it cannot say)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except (RuntimeError, ValueError):
        return None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelSourceError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("--device cuda was asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def default_vae_dtype(family: str, device: torch.device) -> torch.dtype:
    """The VAE's dtype on `device` (`icdcli.core.dtypes.vae_precision`): fp16 for SD1.5 and bf16 for SDXL on CUDA (bf16
    where the GPU has it, else fp32), fp32 elsewhere."""
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return getattr(torch, vae_precision(family, device.type, bf16=bf16))


class _UNetSlot:
    """`model.<role>_unet`: the UNet of that role, read again from its folder when it was released."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.role = name.removesuffix("_unet")

    def __get__(self, model: ICDModel | None, owner: type | None = None) -> Any:
        return self if model is None else model._unet(self.role)

    def __set__(self, model: ICDModel, unet: DiffusersModule | None) -> None:
        model._unets[self.role] = unet


class ICDModel:
    """Text encoder(s) and tokenizer(s), VAE, forward and reverse UNets, optional teacher, metadata.

    The VAE and text encoders are shared by all UNets. UNets and text encoders use `dtype`; the VAE `vae_dtype`
    (float32 but on CUDA, where SD1.5's runs in float16 and SDXL's in bfloat16: it overflows in float16). How the
    UNets run (eagerly, CUDA graphs, torch.compile) is `execution` (`set_execution`).
    """

    def __init__(
        self,
        info: ModelInfo,
        vae: DiffusersModule,
        text_encoders: list[DiffusersModule],
        tokenizers: list[Any],
        forward_unet: DiffusersModule,
        reverse_unet: DiffusersModule,
        *,
        teacher_unet: DiffusersModule | None = None,
        source: str = "",
    ):
        self.info = info
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self._unets: dict[str, DiffusersModule | None] = {
            "forward": forward_unet, "reverse": reverse_unet, "teacher": teacher_unet,
        }  # fmt: skip
        self.unet_folders: dict[str, Path] = {}  # where a released UNet is read again from (merged folders)
        self.low_memory = False
        self.source = source
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vae_dtype = torch.float32
        self.execution = TorchExecution()
        self.execution_notes: list[str] = []
        self._capture: Capture | None = None
        self._compile_backend, self._anywhere = "inductor", False
        self._fast: dict[str, Any] = {}  # role -> GraphedCalls / CompiledCalls of the UNet now in that slot
        for module in self._modules():
            module.eval().requires_grad_(False)

    # --- the UNets, which a low-memory edit releases between its stages ----------------------

    def _unet(self, role: str) -> DiffusersModule | None:
        unet = self._unets[role]
        if unet is None and role in self.unet_folders:
            unet = _load_unet(self.unet_folders[role]).to(self.device, self.dtype).eval().requires_grad_(False)
            self._unets[role] = unet
        return unet

    forward_unet = _UNetSlot()
    reverse_unet = _UNetSlot()
    teacher_unet = _UNetSlot()

    def release(self, role: str) -> None:
        """Drop the `role` UNet ("forward", "reverse" or "teacher") until it is next used, when it is read again from
        its merged folder (its weights are mapped from there, so this costs page faults, not a fuse). A UNet that
        exists only in memory (fused without a cache) is kept."""
        if role in self.unet_folders and self._unets[role] is not None:
            self._unets[role] = None
            self._fast.pop(role, None)  # a graph holds the released weights' addresses
            gc.collect()

    def _modules(self) -> list[torch.nn.Module]:
        unets = [unet for unet in self._unets.values() if unet is not None]  # released ones are moved when read again
        return [self.vae, *self.text_encoders, *unets]

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None
    ) -> ICDModel:
        """Move the model: UNets and text encoders in `dtype` (default: fp16 on CUDA, else fp32), the VAE in
        `vae_dtype` (default: `default_vae_dtype`, fp32 but on CUDA)."""
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.vae_dtype = vae_dtype or default_vae_dtype(self.info.family, self.device)
        self.vae.to(self.device, self.vae_dtype)
        self._fast.clear()  # graphs and compiled code belong to the weights where they were
        if self.low_memory:  # converted when next read, one at a time: never both UNets' converted copies at once
            for role in self.unet_folders:
                self.release(role)
        for module in self._modules()[1:]:
            module.to(self.device, self.dtype)
        if self.execution.channels_last:
            self._channels_last()
        return self

    def set_execution(
        self,
        execution: TorchExecution,
        *,
        capture: Capture | None = None,
        compile_backend: str = "inductor",
        anywhere: bool = False,
    ) -> ICDModel:
        """Run the UNets as `execution` says. CUDA graphs and torch.compile take effect on CUDA; elsewhere the UNets
        run eagerly and `execution_notes` says so, unless `anywhere` (their bookkeeping on any device, for tests:
        graphs then default to `icdcli.backends.torch_speed.eager_replay`). `capture` replaces the CUDA graph capture;
        `compile_backend` is torch.compile's backend."""
        self.execution, self._capture, self._compile_backend = execution, capture, compile_backend
        self._anywhere = anywhere
        self._fast.clear()
        if execution.channels_last:
            self._channels_last()
        if self.device.type != "cuda" and not anywhere and (execution.cuda_graphs or execution.compile):
            what = "CUDA graphs" if execution.cuda_graphs else "torch.compile"
            self._note(f"{what} speed up PyTorch on CUDA only: on {self.device.type} the UNets run eagerly")
        return self

    def _channels_last(self) -> None:
        for unet in self._unets.values():
            if unet is not None:
                unet.to(memory_format=torch.channels_last)

    def _note(self, text: str) -> None:
        if text not in self.execution_notes:
            self.execution_notes.append(text)
            logger.info(text)

    def _denoiser(self, unet: DiffusersModule, role: str) -> UNetDenoiser:
        """The UNet of `role` behind the denoiser interface, run the way `execution` says (graphs and compiled code
        kept per role until the UNet is released or moved)."""
        from icdcli.backends.torch_speed import CompiledCalls, CudaGraphCapture, GraphedCalls, eager_replay

        execution, fast = self.execution, self._fast.get(role)
        if self.device.type != "cuda" and not self._anywhere:
            return UNetDenoiser(unet)
        if execution.cuda_graphs:
            if fast is None:
                capture = self._capture or (
                    CudaGraphCapture(self.device) if self.device.type == "cuda" else eager_replay
                )
                fast = self._fast[role] = GraphedCalls(capture, name=f"{role} UNet", note=self._note)
            return UNetDenoiser(unet, graphs=fast)
        if execution.compile:
            if fast is None:
                fast = CompiledCalls(unet, name=f"{role} UNet", note=self._note, backend=self._compile_backend)
                self._fast[role] = fast
            return UNetDenoiser(unet, compiled=fast)
        return UNetDenoiser(unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def forward_denoiser(self) -> UNetDenoiser:
        return self._denoiser(self.forward_unet, "forward")

    @property
    def reverse_denoiser(self) -> UNetDenoiser:
        return self._denoiser(self.reverse_unet, "reverse")

    @property
    def teacher_denoiser(self) -> UNetDenoiser:
        if self.teacher_unet is None:
            raise ModelSourceError(
                f"model {self.info.name!r} has no teacher UNet, so --sampler ddim cannot run: "
                "use --sampler icd, or a model folder that includes teacher_unet/"
            )
        return self._denoiser(self.teacher_unet, "teacher")

    # --- text -------------------------------------------------------------------------------

    def prompt_token_count(self, text: str) -> tuple[int, int]:
        """(tokens the prompt needs, tokens the first text encoder takes), specials included."""
        tokenizer = self.tokenizers[0]
        return len(tokenizer(text, truncation=False).input_ids), tokenizer.model_max_length

    @torch.no_grad()
    def encode_prompt(self, text: str | list[str]) -> PromptEmbedding:
        """Encode one prompt, or a list of prompts as a batch."""
        for prompt in [text] if isinstance(text, str) else text:
            warn_if_truncated(self, prompt)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            if self.info.family == SDXL:
                output = encoder(ids, output_hidden_states=True)
                hidden.append(output.hidden_states[-2])
                pooled = output[0]
            else:
                hidden.append(encoder(ids)[0])
        return PromptEmbedding(torch.cat(hidden, dim=-1), pooled)

    def conditioning(
        self, prompt: str | list[str], height: int, width: int, with_negative: bool = False
    ) -> Conditioning:
        """Conditioning for images of `height` x `width` pixels; a negative (empty) prompt when asked."""
        return prompt_conditioning(self, prompt, height, width, with_negative)

    def needs_negative(self, guidance: float) -> bool:
        return not self.info.guidance_distilled and guidance != 1.0

    # --- images -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> clean latents: VAE posterior mean times scaling factor."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return posterior.mean.float() * self.info.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> pixels in [-1, 1]."""
        scaled = (latents.float() / self.info.scaling_factor).to(self.device, self.vae_dtype)
        return self.vae.decode(scaled).sample.float().clamp(-1, 1)

    # --- saving -----------------------------------------------------------------------------

    def save_merged(self, folder: str | Path, include_teacher: bool = True) -> Path:
        """Write this model as a merged folder, atomically (a temporary folder renamed at the end)."""
        folder = Path(folder)
        with atomic_folder(folder) as staging:
            self.write_merged(staging, include_teacher)
        return folder

    def write_merged(self, folder: Path, include_teacher: bool = True) -> None:
        """Write this model's parts and icd.json into `folder`; parts already there (spilled while fusing) stay."""
        parts: dict[str, Any] = {"vae": self.vae, "forward_unet": self.forward_unet}
        parts["reverse_unet"] = self.reverse_unet
        if include_teacher and self.teacher_unet is not None:
            parts["teacher_unet"] = self.teacher_unet
        suffixes = [""] if len(self.text_encoders) == 1 else ["", "_2"]
        for suffix, encoder, tokenizer in zip(suffixes, self.text_encoders, self.tokenizers, strict=True):
            parts[f"text_encoder{suffix}"] = encoder
            parts[f"tokenizer{suffix}"] = tokenizer
        for name, part in parts.items():
            if (folder / name).exists():
                continue
            writer: Any = part  # a diffusers/transformers model or a tokenizer
            if isinstance(part, torch.nn.Module):
                writer.save_pretrained(folder / name, safe_serialization=True)
            else:
                writer.save_pretrained(folder / name)
        (folder / MODEL_JSON).write_text(
            json.dumps({"format": "merged", "format_version": FORMAT_VERSION, **self.info.to_json()}, indent=2)
        )


# --- loading components -----------------------------------------------------------------------


def _family_of(base: Path) -> str:
    return SDXL if (base / "text_encoder_2").is_dir() else SD15


def _load_text_stack(folder: Path, family: str) -> tuple[list[DiffusersModule], list[Any]]:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    suffixes = ["", "_2"] if family == SDXL else [""]
    encoders, tokenizers = [], []
    for index, suffix in enumerate(suffixes):
        cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        encoders.append(cls.from_pretrained(folder / f"text_encoder{suffix}", use_safetensors=True))
        tokenizers.append(AutoTokenizer.from_pretrained(folder / f"tokenizer{suffix}"))
    return encoders, tokenizers


def _load_vae(folder: Path) -> DiffusersModule:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)


def _load_unet(folder: Path) -> DiffusersModule:
    """A diffusers UNet folder, in the dtype its file stores: diffusers would otherwise cast a float16 file to float32,
    a private copy of twice the size instead of the file's pages (an SDXL UNet: 10 GB instead of 5 GB, mapped)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, torch_dtype=stored_dtype(folder))


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first weight in a diffusers folder's single safetensors file (None: not one such file)."""
    from safetensors import SafetensorError, safe_open

    from icdcli.models.weights_io import SAFETENSORS_DTYPES, WEIGHTS_NAME

    try:
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
            first = next(iter(handle.keys()), None)
            kind = None if first is None else handle.get_slice(first).get_dtype()
    except (OSError, SafetensorError):
        return None
    return next((dtype for dtype, name in SAFETENSORS_DTYPES.items() if name == kind), None)


def _describe(info_json: dict[str, Any], unet: DiffusersModule, vae: DiffusersModule, family: str) -> dict[str, Any]:
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    info_json.setdefault("family", family)
    info_json.setdefault("scaling_factor", float(vae.config.scaling_factor))
    info_json.setdefault("native_size", int(sample_size * vae_scale))
    info_json.setdefault("size_multiple", int(vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)))
    info_json.setdefault("guidance_distilled", unet.config.time_cond_proj_dim is not None)
    return info_json


def load_merged(folder: str | Path, need_teacher: bool = False) -> ICDModel:
    folder = Path(folder)
    data = _read_model_json(folder)
    if data.get("format") != "merged":
        raise ModelSourceError(f"{folder / MODEL_JSON} is not a merged model (format {data.get('format')!r})")
    family = data.get("family", _family_of(folder))
    _check_folder_weights(folder)
    try:
        vae = _load_vae(folder)
        encoders, tokenizers = _load_text_stack(folder, family)
        forward = _load_unet(folder / "forward_unet")
        reverse = _load_unet(folder / "reverse_unet")
        teacher = None
        if need_teacher and (folder / "teacher_unet").is_dir():
            teacher = _load_unet(folder / "teacher_unet")
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"cannot load the model folder {folder}: {error}".splitlines()[0]) from error
    info = ModelInfo.from_json(_describe(dict(data), reverse, vae, family))
    model = ICDModel(info, vae, encoders, tokenizers, forward, reverse, teacher_unet=teacher, source=str(folder))
    model.unet_folders = {role: folder / f"{role}_unet" for role in ("forward", "reverse")}
    if teacher is not None:
        model.unet_folders["teacher"] = folder / "teacher_unet"
    return model


def _read_model_json(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ModelSourceError(f"{folder} is not an icd model folder (no {MODEL_JSON})") from error
    except json.JSONDecodeError as error:
        raise ModelSourceError(f"{path} is not valid JSON ({error}): re-create the model folder") from error


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A UNet state dict from safetensors or a pickled `.pt` (loaded with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_weights(path)
        return load_file(str(path))
    import pickle

    try:
        # mapped, not read: the weights stay file pages until fusing writes a layer (an SDXL teacher is 5 GB)
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=_zip_checkpoint(path))
    except pickle.UnpicklingError:  # weights_only refuses objects other than tensors and containers
        raise ModelSourceError(
            f"{path} holds Python objects besides tensors, which icd does not unpickle (loading them could run "
            "arbitrary code): give the plain UNet state dict, or convert the file to safetensors where you trust it"
        ) from None
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise ModelSourceError(f"cannot read {path} as a torch checkpoint of UNet weights: {error}") from error
    while isinstance(loaded, dict) and len(loaded) == 1 and next(iter(loaded)) in ("state_dict", "model", "unet"):
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelSourceError(f"{path} does not hold a plain UNet state dict")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _zip_checkpoint(path: Path) -> bool:
    """Whether `path` is a zip-format torch checkpoint (what torch.save writes since 1.6), which torch can map."""
    import zipfile

    return zipfile.is_zipfile(path)


def _unet_skeleton(config: dict[str, Any]) -> torch.nn.Module:
    """A UNet of `config` on the meta device: shapes without memory, filled by `load_state_dict(assign=True)`."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _wider(first: torch.dtype, second: torch.dtype) -> torch.dtype:
    return torch.float32 if torch.float32 in (first, second) else second


def build_teacher_unet(
    base: Path, teacher: str | Path | None, *, dtype: torch.dtype = torch.float32, fuse: Any | None = None
) -> torch.nn.Module:
    """The base pipeline's UNet architecture with the teacher's weights (`time_cond_proj_dim` if present).

    The weights are read straight into the module (never a second copy beside a randomly initialised one) and
    end in `dtype`. `fuse` (a `LoraAdapter`) is added in place first, in fp32 where either side is fp32.
    """
    from diffusers import UNet2DConditionModel

    if teacher is None:
        unet = _load_unet(base / "unet")
    else:
        state = load_state_dict(teacher)
        config = dict(UNet2DConditionModel.load_config(base / "unet"))
        config["time_cond_proj_dim"] = state[COND_PROJ_KEY].shape[1] if COND_PROJ_KEY in state else None
        unet = _unet_skeleton(config)
        expected = unet.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        misshapen = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if missing or unexpected or misshapen:
            names = (missing + unexpected + misshapen)[:3]
            raise ModelSourceError(
                f"teacher {teacher} does not fit the base UNet in {base}: {len(missing)} missing, "
                f"{len(unexpected)} unexpected and {len(misshapen)} misshapen weights ({', '.join(names)})"
            )
        unet.load_state_dict(state, strict=True, assign=True)
        del state, expected  # the module holds the only reference to each weight now
    stored = next(unet.parameters()).dtype
    if fuse is not None:
        unet.to(_wider(stored, dtype))  # one tensor at a time: the old one is freed as its replacement lands
        fuse_lora(unet, fuse)
    return unet.to(dtype).eval()


@dataclass
class LoraSources:
    """A base pipeline folder, an optional teacher state dict and the two LoRA files."""

    base: Path
    teacher: Path | None
    forward_lora: Path
    reverse_lora: Path
    name: str = ""
    edit: dict[str, Any] | None = None
    generate_guidance: float | None = None
    cache_half: bool = False  # keep the fused UNets and text encoders in float16 (what a GPU runs)
    forward_boundaries: tuple[int, ...] | None = None  # given (flags, a preset, icd.json): for files not named by them
    reverse_boundaries: tuple[int, ...] | None = None

    def recipe(self, family: str, reverse: tuple[int, ...]) -> EditRecipe:
        """The edit recipe: what the preset or folder gives (`edit`), else the family's release recipe."""
        try:
            return EditRecipe.from_json(self.edit, release_recipe(family, reverse))
        except (TypeError, ValueError) as error:
            where = self.name or self.forward_lora.parent
            raise ModelSourceError(f"the edit recipe of {where} is malformed: {error}") from None

    def boundaries(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The forward and reverse boundaries: from each file's name (the release's `..._19_259_519_779`) or as
        given (`--forward-boundaries`, a preset, icd.json) for a file named otherwise; a name and a given set that
        disagree, or neither, are a ModelSourceError that says which."""
        found = {
            role: self._role_boundaries(role, path, given)
            for role, path, given in (
                ("forward", self.forward_lora, self.forward_boundaries),
                ("reverse", self.reverse_lora, self.reverse_boundaries),
            )
        }
        try:
            validate_boundaries(found["forward"], found["reverse"])
        except ValueError as error:
            raise ModelSourceError(f"the forward and reverse models do not belong together: {error}") from error
        return found["forward"], found["reverse"]

    @staticmethod
    def _role_boundaries(role: str, path: Path, given: tuple[int, ...] | None) -> tuple[int, ...]:
        flag = f"--{role}-boundaries"
        try:
            named_role, named = boundaries_from_filename(path)
        except ValueError:
            if given is None:
                example = "0,259,519,779" if role == "forward" else "259,519,779,999"
                raise ModelSourceError(
                    f"the {role} model {path.name} does not name its boundaries (like {role}_19_259_519_779): give "
                    f"them with {flag} (a comma list such as {example})"
                ) from None
            return tuple(given)
        if named_role != role:
            raise ModelSourceError(f"--{role}-lora {path.name} is named as a {named_role} model: are they swapped?")
        if given is not None and tuple(given) != named:
            raise ModelSourceError(
                f"{path.name} names the boundaries {','.join(map(str, named))} but {flag} says "
                f"{','.join(map(str, given))}: give the ones the model was trained with (or rename the file)"
            )
        return named

    def cache_key(self) -> str:
        """Name of the fused-model cache folder: the files' stamps, cheap to recompute on every load."""
        return sources_key(self, version=FORMAT_VERSION)

    def cache_folder(self) -> Path:
        """The fused model's merged folder in the cache (it may not exist yet)."""
        return cache_root() / "merged" / self.cache_key()


def fuse_lora_model(
    sources: LoraSources,
    *,
    keep_teacher: bool = True,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype = torch.float32,
    spill: Callable[[str, DiffusersModule], DiffusersModule] | None = None,
) -> ICDModel:
    """Build forward and reverse UNets by fusing the LoRA files into the teacher's weights, in `dtype`.

    Each fused UNet reads the teacher's file anew and is fused in place, so memory holds at most the two fused
    UNets (and the teacher only with `keep_teacher`), never a teacher beside two copies of it. `spill(role, unet)`
    may take each fused UNet as it is made and return what stands in for it (the cache writes it to disk and maps
    it back, so private memory holds one UNet at a time).

    Args:
        sources: The base pipeline, teacher and LoRA files.
        keep_teacher: Also build the plain teacher UNet (for the DDIM baseline).
        progress: Called with a line for each stage.
        dtype: The dtype of the fused UNets.
        spill: Takes each fused UNet as it is made; returns what stands in for it.
    """
    for label, path in (("--base", sources.base), ("--forward-lora", sources.forward_lora)):
        if not Path(path).exists():
            raise ModelSourceError(f"{label} {path} does not exist")
    if not sources.reverse_lora.exists():
        raise ModelSourceError(f"--reverse-lora {sources.reverse_lora} does not exist")
    if sources.teacher is not None and not sources.teacher.exists():
        raise ModelSourceError(f"--teacher {sources.teacher} does not exist")
    if not (sources.base / "vae").is_dir():
        raise ModelSourceError(f"--base {sources.base} is not a diffusers pipeline folder (no vae/ inside)")
    forward_bounds, reverse_bounds = sources.boundaries()
    family = _family_of(sources.base)
    say = progress or (lambda message: None)
    say("loading the base pipeline")
    vae = _load_vae(sources.base)
    encoders, tokenizers = _load_text_stack(sources.base, family)
    unets = {}
    for role, path in (("forward", sources.forward_lora), ("reverse", sources.reverse_lora)):
        say(f"fusing the {role} LoRA into the teacher")
        check_weights(path)
        try:
            adapter = read_lora(path)
        except (ValueError, OSError) as error:
            raise ModelSourceError(f"cannot fuse {path}: {error}") from error
        try:
            unet = build_teacher_unet(sources.base, sources.teacher, dtype=dtype, fuse=adapter)
        except ValueError as error:  # the adapter does not fit the teacher
            raise ModelSourceError(f"cannot fuse {path}: {error}") from error
        del adapter
        unets[role] = spill(role, unet) if spill is not None else unet
        del unet
    teacher = build_teacher_unet(sources.base, sources.teacher, dtype=dtype) if keep_teacher else None
    info_json = {
        "name": sources.name or sources.forward_lora.parent.name,
        "forward_boundaries": forward_bounds,
        "reverse_boundaries": reverse_bounds,
        "edit": sources.recipe(family, reverse_bounds).to_json(),
        "generate_guidance": sources.generate_guidance if sources.generate_guidance is not None else 8.0,
        "made_from": made_from(sources),
    }
    info = ModelInfo.from_json(_describe(info_json, unets["reverse"], vae, family))
    return ICDModel(
        info, vae, encoders, tokenizers, unets["forward"], unets["reverse"], teacher_unet=teacher,
        source=str(sources.forward_lora.parent),
    )  # fmt: skip


def _add_teacher(cached: Path, sources: LoraSources, model: ICDModel, dtype: torch.dtype) -> None:
    """Give a model from a fused cache that was written without a teacher its teacher, and the cache too."""
    teacher: DiffusersModule = build_teacher_unet(sources.base, sources.teacher, dtype=dtype).requires_grad_(False)
    model.teacher_unet = teacher
    try:
        with atomic_folder(cached / "teacher_unet") as staging:
            teacher.save_pretrained(staging, safe_serialization=True)
    except OSError as error:
        logger.warning("could not add the teacher to the fused-model cache %s: %s", cached, error)


def load_lora_cached(
    sources: LoraSources, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None
) -> ICDModel:
    """Fuse `sources` once and keep the result as a merged folder in the cache; later loads read it.

    The teacher is read (and cached) only when asked for: an iCD edit runs on the two fused UNets alone.

    Args:
        sources: What to fuse; `sources.cache_key()` names the cached folder.
        need_teacher: Load the teacher UNet too, adding it to a cache written without it.
        progress: Called with a line for each stage of fusing.
    """
    cached = sources.cache_folder()
    dtype = torch.float16 if sources.cache_half else torch.float32
    if (cached / MODEL_JSON).is_file():
        try:
            model = load_merged(cached, need_teacher=need_teacher)
            mark_used(cached)
            model.info.edit = sources.recipe(model.info.family, model.info.reverse_boundaries)  # the source's, as now
            if need_teacher and model.teacher_unet is None:
                _add_teacher(cached, sources, model, dtype)
            return model
        except ModelSourceError as error:
            logger.warning("ignoring a broken fused-model cache at %s (%s); fusing again", cached, error)
    try:
        with atomic_folder(cached) as staging:

            def spill(role: str, unet: DiffusersModule) -> DiffusersModule:
                # written now and mapped back: its weights become file pages the kernel can drop and re-read, so
                # private memory never holds both fused UNets (7 GB for SD1.5 in fp32), during fusing or after
                save_unet(unet, staging / f"{role}_unet")
                del unet
                return _load_unet(staging / f"{role}_unet").requires_grad_(False)

            model = fuse_lora_model(sources, keep_teacher=need_teacher, progress=progress, dtype=dtype, spill=spill)
            for encoder in model.text_encoders:
                encoder.to(dtype)  # the VAE stays float32
            model.write_merged(staging)
        model.unet_folders = {role: cached / f"{role}_unet" for role in ("forward", "reverse")}
        return model
    except OSError as error:
        logger.warning("could not cache the fused model in %s: %s; fusing in memory", cached, error)
    model = fuse_lora_model(sources, keep_teacher=need_teacher, progress=progress, dtype=dtype)
    for encoder in model.text_encoders:
        encoder.to(dtype)
    return model


def _folder_recipe(data: dict[str, Any]) -> dict[str, Any] | None:
    """A folder's `edit` recipe; folders written before recipes existed give `edit_guidance` and `tau`."""
    if isinstance(data.get("edit"), dict):
        return data["edit"]
    legacy = {"guidance": data.get("edit_guidance"), "tau": data.get("tau")}
    return {key: value for key, value in legacy.items() if value is not None} or None


def load_lora_folder(
    folder: Path, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None, half: bool = False
) -> ICDModel:
    """A folder whose icd.json has `"format": "lora"` and names its parts by relative path."""
    sources = lora_folder_sources(folder, _read_model_json(folder), half=half)
    return load_lora_cached(sources, need_teacher=need_teacher, progress=progress)


def _given_boundaries(data: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """Boundaries a `lora` folder's icd.json records for a LoRA file whose name does not carry them."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise ModelSourceError(f"{key} in {MODEL_JSON} must be a list of timesteps, like [0, 259, 519, 779]")
    return tuple(value)


def lora_folder_sources(folder: Path, data: dict[str, Any], *, half: bool = False) -> LoraSources:
    """The parts a `lora` folder's icd.json (`data`) names, by path relative to the folder."""
    try:
        return LoraSources(
            base=folder / data["base"],
            teacher=folder / data["teacher"] if data.get("teacher") else None,
            forward_lora=folder / data["forward_lora"],
            reverse_lora=folder / data["reverse_lora"],
            name=data.get("name", folder.name),
            edit=_folder_recipe(data),
            generate_guidance=data.get("generate_guidance"),
            cache_half=half,
            forward_boundaries=_given_boundaries(data, "forward_boundaries"),
            reverse_boundaries=_given_boundaries(data, "reverse_boundaries"),
        )
    except KeyError as error:
        raise ModelSourceError(f"{folder / MODEL_JSON} lacks the key {error}") from error


def load_model_folder(
    folder: str | Path, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None, half: bool = False
) -> ICDModel:
    """An icd model folder; a `lora` one is fused once and cached.

    Args:
        folder: A folder with `icd.json`, merged or lora.
        need_teacher: Load the teacher UNet too (the DDIM baseline needs it).
        progress: Called with a line for each stage of fusing.
        half: Keep a fused cache in float16.
    """
    folder = Path(folder)
    data = _read_model_json(folder)
    if data.get("format") == "lora":
        return load_lora_folder(folder, need_teacher=need_teacher, progress=progress, half=half)
    return load_merged(folder, need_teacher)
