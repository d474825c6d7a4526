"""UNets built from a base pipeline's architecture and a teacher's state dict, LoRA fused in where asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from icdcli.core.errors import ModelSourceError
from icdcli.models.components import check_weights, load_unet
from icdcli.models.lora import fuse_lora

COND_PROJ_KEY = "time_embedding.cond_proj.weight"


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
        unet = load_unet(base / "unet")
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
