"""Limits checked before any model loads: image sizes the model can take and the memory they would need.

A model's sizes come from its configuration files alone (icd.json, the UNet's and VAE's config.json), so a
size that cannot work is refused in a moment instead of after loading, or after asking for terabytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bytes per image pixel that decoding holds at once (VAE decoder activations at full size, fp32), measured
# loosely; and bytes per entry of the largest attention map (one head, fp32: the VAE's mid-block attention)
BYTES_PER_PIXEL = 4096
BYTES_PER_ATTENTION_ENTRY = 4


@dataclass(frozen=True)
class Sizes:
    """What a model takes: its native side, the multiple both sides must be, and the VAE's downscaling."""

    native: int
    multiple: int
    vae_factor: int


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_pipeline(folder: Path) -> Sizes | None:
    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        sample = unet["sample_size"]
        sample = sample[0] if isinstance(sample, list) else sample
        return Sizes(int(sample) * factor, factor * 2 ** (len(unet["block_out_channels"]) - 1), factor)
    except (KeyError, TypeError, ValueError):
        return None


def model_sizes(model: str | None, base: str | None) -> Sizes | None:
    """The sizes of the model `icd` would load for these flags, from its files; None when unknown here."""
    from icdcli.models.sources import DEFAULT_MODEL, DEFAULT_MODEL_DIR, MODEL_JSON, PRESETS

    if base:
        return _from_pipeline(Path(base))
    if model in PRESETS:
        return None
    folder = DEFAULT_MODEL_DIR if model in (None, DEFAULT_MODEL) else Path(model).expanduser()
    data = _json(folder / MODEL_JSON)
    if data.get("format") == "lora" and isinstance(data.get("base"), str):
        return _from_pipeline(folder / data["base"])
    vae = _json(folder / "vae" / "config.json")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return Sizes(int(data["native_size"]), int(data["size_multiple"]), factor)
    except (KeyError, TypeError, ValueError):
        return None


def needed_bytes(width: int, height: int, vae_factor: int) -> int:
    """A rough bound of the memory one image of this size needs while it is decoded."""
    tokens = (width // vae_factor) * (height // vae_factor)
    return BYTES_PER_PIXEL * width * height + BYTES_PER_ATTENTION_ENTRY * tokens * tokens


def available_bytes() -> int | None:
    """Memory this machine has free now (Linux and macOS); None when it cannot tell."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def largest_square(budget: int, sizes: Sizes) -> int:
    """The largest square side (a multiple of the model's) whose estimate fits in `budget` bytes."""
    side = sizes.multiple
    low, high = 0, max(1, int(math.isqrt(max(budget, 0) // BYTES_PER_PIXEL) // sizes.multiple) + 1)
    while low < high:  # the estimate grows with the side: bisect on multiples
        middle = (low + high + 1) // 2
        if needed_bytes(middle * sizes.multiple, middle * sizes.multiple, sizes.vae_factor) <= budget:
            low = middle
        else:
            high = middle - 1
    return max(low * sizes.multiple, 0) or side


def size_problem(width: int, height: int, sizes: Sizes, budget: int | None) -> str | None:
    """Why this model cannot make a `width` x `height` image here (what to give instead); None when it can."""
    if width % sizes.multiple or height % sizes.multiple:
        return (
            f"--width and --height must be multiples of {sizes.multiple} for this model "
            f"(its native size is {sizes.native}x{sizes.native})"
        )
    if budget is not None and needed_bytes(width, height, sizes.vae_factor) > budget:
        need = needed_bytes(width, height, sizes.vae_factor)
        side = largest_square(budget, sizes)
        return (
            f"{width}x{height} needs about {_gib(need)} of memory and {_gib(budget)} is free; "
            f"the largest square this machine can make is about {side}x{side}"
        )
    return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size < 2**40 else f"{size / 2**40:.1f} TiB"
