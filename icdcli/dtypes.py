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
