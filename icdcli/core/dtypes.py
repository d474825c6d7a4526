"""Tensor element types by the names the export manifest records, importable without torch.

The exporter, ONNX Runtime and TensorRT all speak of dtypes by these names; torch is imported only when a
torch dtype is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

DTYPE_NAMES = ("float32", "float16", "int32", "int64")
"""Element types an exported graph's inputs and outputs may have."""


class _TorchDtypes(Mapping):
    """dtype name -> torch dtype, resolved on first use (importing this module does not import torch)."""

    def __getitem__(self, name: str) -> Any:
        if name not in DTYPE_NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(DTYPE_NAMES)

    def __len__(self) -> int:
        return len(DTYPE_NAMES)


TORCH_DTYPES: Mapping[str, Any] = _TorchDtypes()


def dtype_name(dtype: Any) -> str:
    """The manifest name of a torch dtype (KeyError for a dtype graphs do not use)."""
    return {value: key for key, value in TORCH_DTYPES.items()}[dtype]


def vae_precision(family: str, device_type: str, *, bf16: bool = False) -> str:
    """The dtype name the VAE runs in: float32 on the CPU and MPS; on CUDA float16 for SD1.5-family VAEs (half the
    cost of float32), bfloat16 for SDXL's where the GPU has it (its VAE overflows in float16), else float32.

    Exported graphs have no bfloat16: an SDXL VAE graph stays float32 (`bf16=False`).
    """
    if device_type != "cuda":
        return "float32"
    if family == "sdxl":
        return "bfloat16" if bf16 else "float32"
    return "float16"
