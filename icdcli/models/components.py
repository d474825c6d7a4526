"""The parts of a model read from disk: weights files checked before loading, the text encoders and tokenizers, the
VAE and UNet folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import cache_root
from icdcli.diffusion.recipe import SD15, SDXL
from icdcli.models.api import DiffusersModule


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


def check_folder_weights(folder: Path) -> None:
    for path in sorted(folder.glob("*/*.safetensors")):
        check_weights(path)


def family_of(base: Path) -> str:
    return SDXL if (base / "text_encoder_2").is_dir() else SD15


def load_text_stack(folder: Path, family: str) -> tuple[list[DiffusersModule], list[Any]]:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    suffixes = ["", "_2"] if family == SDXL else [""]
    encoders, tokenizers = [], []
    for index, suffix in enumerate(suffixes):
        cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        encoders.append(cls.from_pretrained(folder / f"text_encoder{suffix}", use_safetensors=True))
        tokenizers.append(AutoTokenizer.from_pretrained(folder / f"tokenizer{suffix}"))
    return encoders, tokenizers


def load_vae(folder: Path) -> DiffusersModule:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)


def load_unet(folder: Path) -> DiffusersModule:
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
