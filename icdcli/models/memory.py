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
GPU_FRACTION = 0.5  # on a GPU: when they exceed this share of its free memory (the rest: activations, VAE, text)


def total_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def release_between_stages(
    unet_bytes: int, setting: bool | None = None, *, total: int | None = None, free_gpu: int | None = None
) -> bool:
    """Whether to free each UNet once its stage is over.

    The memory that holds the weights decides: on a GPU (`free_gpu` given) its free memory before the model
    loads, on the CPU the machine's physical memory.

    Args:
        unet_bytes: the weights of the UNets an edit runs (forward and reverse).
        setting: the user's choice (`--low-memory` / `--no-low-memory`); None decides by size.
        total: the memory to compare with on the CPU (default: this machine's physical memory).
        free_gpu: the free memory of the GPU the model will run on; None when it runs on the CPU.
    """
    if setting is not None:
        return setting
    if free_gpu is not None:
        return unet_bytes > GPU_FRACTION * free_gpu
    total = total_memory_bytes() if total is None else total
    return total is not None and unet_bytes > AUTO_FRACTION * total
