"""The models `icd bench gpu` times: the release's architectures with seeded random weights, built directly on the
device (with an fp32 CPU twin for parity), and their execution modes (eager, CUDA graphs, torch.compile)."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from icdcli.core.errors import ICDError

NO_MODES = "execution modes not available in this build (icdcli.models.torch_speed / ICDModel.set_execution missing)"


@dataclass
class Built:
    """One architecture's model on the device, its fp32 CPU twin for parity (None when not asked), and facts."""

    model: Any
    reference: Any
    facts: dict[str, Any]


def build_model(
    arch: str, *, width: float, size: int, device: Any, dtype: Any, seed: int, reference: bool, tokenizer: Any
) -> Built:
    """The release's model of `arch` with seeded random weights, built in fp32 directly on `device` (PyTorch's
    default initialisation runs there: seconds on a GPU, no files), then converted as `icd edit` runs it (UNets and
    text encoders in `dtype`, the VAE in the model's default for the device). `reference`: keep an fp32 copy on the
    CPU first, for parity."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from icdcli.bench.scale_models import GUIDANCE_DIM, RELEASE, text_configs, unet_config, vae_config
    from icdcli.diffusion.recipe import release_recipe
    from icdcli.models.info import ModelInfo
    from icdcli.models.runtime import ICDModel

    release = RELEASE[arch]
    config = unet_config(arch, width, GUIDANCE_DIM)
    with torch.device(device):
        torch.manual_seed(seed)
        unets = [UNet2DConditionModel.from_config(config) for _ in ("forward", "reverse")]
        vae = AutoencoderKL.from_config(vae_config(arch, width))
        encoders = []
        for position, text in enumerate(text_configs(arch, width)):
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
            kind = CLIPTextModelWithProjection if position == 1 else CLIPTextModel
            encoders.append(kind(CLIPTextConfig(**text, **ids)))
    check_size(arch, size)
    info = ModelInfo(
        name=f"bench-gpu-{arch}" + (f"-w{width:g}" if width < 1 else ""),
        family=arch,
        forward_boundaries=release["forward"],
        reverse_boundaries=release["reverse"],
        guidance_distilled=True,
        scaling_factor=release["scaling_factor"],
        native_size=size,
        size_multiple=size_step(arch),
        edit=release_recipe(arch, release["reverse"]),
    )
    parts = [vae, encoders, *unets]
    twin = None
    if reference:  # one module at a time: the GPU holds at most one extra copy while it moves
        vae_copy, encoders_copy, forward_copy, reverse_copy = (
            [_cpu_copy(m) for m in part] if isinstance(part, list) else _cpu_copy(part) for part in parts
        )
        tokenizers = [tokenizer] * len(encoders)
        twin = ICDModel(info, vae_copy, encoders_copy, tokenizers, forward_copy, reverse_copy, source="bench-gpu")
        twin.to("cpu", torch.float32)
    model = ICDModel(info, vae, encoders, [tokenizer] * len(encoders), *unets, source="bench-gpu (random weights)")
    model.to(device, dtype)
    count = {"unet": sum(p.numel() for p in unets[0].parameters()), "vae": sum(p.numel() for p in vae.parameters()),
             "text": sum(p.numel() for e in encoders for p in e.parameters())}  # fmt: skip
    vae_dtype = getattr(model, "vae_dtype", torch.float32)
    facts = {"parameters_m": {k: round(v / 1e6, 1) for k, v in count.items()}, "dtype": str(dtype).split(".")[-1],
             "vae_dtype": str(vae_dtype).split(".")[-1],
             "guidance_dim": unets[0].config.time_cond_proj_dim, "forward": list(release["forward"]),
             "reverse": list(release["reverse"]), "recipe": info.edit.to_json()}  # fmt: skip
    return Built(model, twin, facts)


def _cpu_copy(module: Any) -> Any:
    return copy.deepcopy(module).to("cpu")


def _execution(mode: str) -> tuple[Any, str | None]:
    """`icdcli.models.torch_speed.TorchExecution.from_mode(mode)`, or why the modes cannot be set in this build."""
    try:
        speed = importlib.import_module("icdcli.models.torch_speed")
        return speed.TorchExecution.from_mode(mode), None
    except (ImportError, AttributeError):
        return None, NO_MODES


def set_mode(model: Any, mode: str) -> str | None:
    """Put `model`'s UNets into `mode`; returns why it cannot be (eager always can: it is what they are)."""
    setter = getattr(model, "set_execution", None)
    execution, problem = _execution(mode)
    if setter is None or execution is None:
        return None if mode == "eager" else problem or NO_MODES
    setter(execution)
    return None


def execution_notes(model: Any) -> list[str]:
    return [str(note) for note in getattr(model, "execution_notes", None) or []]


@contextmanager
def default_attention(unet: Any) -> Iterator[None]:
    """Give `unet` back the attention processors it had once the block is over (a P2P edit installs its own), so
    every mode's rows run the same attention."""
    saved = dict(unet.attn_processors) if hasattr(unet, "attn_processors") else None
    try:
        yield
    finally:
        if saved is not None:
            unet.set_attn_processor(saved)
            unet.__dict__.pop("_icd_p2p_installed", None)  # icdcli.diffusion.p2p's mark that its processors are in


def size_step(arch: str) -> int:
    """The side step of `arch`'s working sizes: the VAE's factor times the UNet's downsampling (64 SD1.5, 32 SDXL)."""
    from icdcli.bench.scale_models import unet_config, vae_config

    vae_scale = 2 ** (len(vae_config(arch)["block_out_channels"]) - 1)
    return int(vae_scale * 2 ** (len(unet_config(arch)["block_out_channels"]) - 1))


def check_size(arch: str, size: int | None) -> None:
    step = size_step(arch)
    if size is not None and size % step:
        raise ICDError(f"--size {size} is not a multiple of {step}, the {arch} models' size step: use e.g. "
                       f"{max(step, size // step * step)}")  # fmt: skip
