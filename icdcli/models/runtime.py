"""The runtime model: text encoders, VAE, forward/reverse (and teacher) UNets and their metadata, on one device,
written to and read from a merged model folder.

Sources that load:
- this tool's model folder, `icd.json` beside the components, in one of two layouts:
  `"format": "merged"` (fused UNets in `forward_unet/`, `reverse_unet/`, optional `teacher_unet/`,
  plus `vae/`, `text_encoder/`, `tokenizer/` and for SDXL `text_encoder_2/`, `tokenizer_2/`; `load_merged` here),
  or `"format": "lora"` (a base pipeline, a teacher state dict and two LoRA files, by relative path;
  `icdcli.models.fusion`);
- a diffusers base pipeline + guidance-distilled teacher state dict + forward/reverse LoRA files in
  the released PEFT layout, fused on load and cached on disk as a merged folder (`icdcli.models.fusion`);
- named presets of the released checkpoints (`icdcli.models.sources`).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch

from icdcli.core.dtypes import vae_precision
from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding, UNetDenoiser
from icdcli.diffusion.recipe import SDXL
from icdcli.io.atomic import atomic_folder
from icdcli.models.api import DiffusersModule, prompt_conditioning
from icdcli.models.components import check_folder_weights, family_of, load_text_stack, load_unet, load_vae
from icdcli.models.info import FORMAT_VERSION, ModelInfo, info_from_networks, read_model_json
from icdcli.models.torch_speed import Capture, TorchExecution

logger = logging.getLogger("icd")


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


def reads_half_cache(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether a model run in `dtype` (None: the device's default) reads its fused cache in float16: half precision
    runs do (bf16 from float16 too), at half the disk and memory of float32's."""
    return dtype in (torch.float16, torch.bfloat16) or (dtype is None and device.type == "cuda")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def default_vae_dtype(family: str, device: torch.device) -> torch.dtype:
    """The VAE's dtype on `device` (`icdcli.core.dtypes.vae_precision`): fp16 for SD1.5 and bf16 for SDXL on CUDA (bf16
    where the GPU has it, else fp32), fp32 elsewhere."""
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return getattr(torch, vae_precision(family, device.type, bf16=bf16))


def default_vae_decoder_dtype(vae_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE decoder's dtype: the VAE's, but bf16 in a bf16 run on the CPU. The decoder is the costliest part of the
    VAE there (an SD1.5 decode at 512 px 12.0 s of a 32.8 s bf16 edit in fp32, about half that in bf16) and its
    rounding reaches only the pixels: at SD1.5 size the edit moved from 2.71 to 2.75 of 255 (mean) from ONNX Runtime
    fp32's, within issue #30's 3; a bf16 encoder also moved the latents the whole edit starts from (2.80), so it stays
    fp32 (docs/benchmarks.md, CPU engines)."""
    return torch.bfloat16 if device.type == "cpu" and dtype == torch.bfloat16 else vae_dtype


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
        self.vae_decoder_dtype = torch.float32
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
            unet = load_unet(self.unet_folders[role]).to(self.device, self.dtype).eval().requires_grad_(False)
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
        `vae_dtype` (default: `default_vae_dtype`, fp32 but on CUDA; its decoder by `default_vae_decoder_dtype`, bf16 in
        a CPU bf16 run, unless `vae_dtype` is given)."""
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.vae_dtype = vae_dtype or default_vae_dtype(self.info.family, self.device)
        self.vae.to(self.device, self.vae_dtype)
        self.vae_decoder_dtype = vae_dtype or default_vae_decoder_dtype(self.vae_dtype, self.dtype, self.device)
        if self.vae_decoder_dtype != self.vae_dtype:
            for part in (self.vae.decoder, getattr(self.vae, "post_quant_conv", None)):
                if part is not None:
                    part.to(self.device, self.vae_decoder_dtype)
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
        graphs then default to `icdcli.models.torch_speed.eager_replay`). `capture` replaces the CUDA graph capture;
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
        from icdcli.models.torch_speed import CompiledCalls, CudaGraphCapture, GraphedCalls, eager_replay

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
        scaled = (latents.float() / self.info.scaling_factor).to(self.device, self.vae_decoder_dtype)
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


def load_merged(folder: str | Path, need_teacher: bool = False) -> ICDModel:
    folder = Path(folder)
    data = read_model_json(folder)
    if data.get("format") != "merged":
        raise ModelSourceError(f"{folder / MODEL_JSON} is not a merged model (format {data.get('format')!r})")
    family = data.get("family", family_of(folder))
    check_folder_weights(folder)
    try:
        vae = load_vae(folder)
        encoders, tokenizers = load_text_stack(folder, family)
        forward = load_unet(folder / "forward_unet")
        reverse = load_unet(folder / "reverse_unet")
        teacher = None
        if need_teacher and (folder / "teacher_unet").is_dir():
            teacher = load_unet(folder / "teacher_unet")
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"cannot load the model folder {folder}: {error}".splitlines()[0]) from error
    info = ModelInfo.from_json(info_from_networks(dict(data), reverse, vae, family))
    model = ICDModel(info, vae, encoders, tokenizers, forward, reverse, teacher_unet=teacher, source=str(folder))
    model.unet_folders = {role: folder / f"{role}_unet" for role in ("forward", "reverse")}
    if teacher is not None:
        model.unet_folders["teacher"] = folder / "teacher_unet"
    return model
