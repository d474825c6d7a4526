"""Whether an edit keeps every network resident, or frees each one's weights once its stage is over.

An iCD edit runs its networks in stages: the VAE encoder and the forward UNet, then the reverse UNet, then the
VAE decoder. At SD1.5 size in float32 the two UNets alone are 6.9 GB; holding both through the whole edit sets the
peak at both plus the activations. Released between stages, the peak is one UNet plus the activations, for the
price of reading the weights again for the next batch (page faults from the cache's mapped files on PyTorch, a new
session on ONNX Runtime). Torch-free, so the CLI can decide before importing anything heavy.
"""

from __future__ import annotations

import os

AUTO_FRACTION = 0.25  # release when the UNets' weights exceed this share of the machine's memory


def total_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def release_between_stages(unet_bytes: int, setting: bool | None = None, *, total: int | None = None) -> bool:
    """Whether to free each UNet once its stage is over.

    Args:
        unet_bytes: the weights of the UNets an edit runs (forward and reverse).
        setting: the user's choice (`--low-memory` / `--no-low-memory`); None decides by size.
        total: the memory to compare with (default: this machine's physical memory).
    """
    if setting is not None:
        return setting
    total = total_memory_bytes() if total is None else total
    return total is not None and unet_bytes > AUTO_FRACTION * total
