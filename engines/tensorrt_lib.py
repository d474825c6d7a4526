"""The TensorRT library as icd uses it: the module (imported lazily), polygraphy's backend, the one logger of the
process, dtypes and the current device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from icdcli.core.errors import ICDError
from icdcli.engines.tensorrt_plan import DeviceFacts
from icdcli.export.cleanup import route_polygraphy_logs


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_module() -> Any:
    """The `tensorrt` module, imported on first use; ICDError naming the install where it is missing."""
    try:
        import tensorrt
    except ImportError as error:
        raise ICDError("TensorRT is not installed: pip install 'icd[tensorrt]' (needs an NVIDIA GPU)") from error
    return tensorrt


def polygraphy_backend() -> Any | None:
    """polygraphy's TensorRT backend, or None where polygraphy is not installed (then TensorRT's builder is used)."""
    try:
        from polygraphy.backend import trt as backend
    except ImportError:
        return None
    return backend


_LOGGER: Any = None


def trt_logger() -> Any:
    """The one TensorRT logger of the process: TensorRT requires every builder and runtime to share one.

    polygraphy builds with its own global logger, so where polygraphy builds that logger is the one.
    """
    global _LOGGER
    if _LOGGER is None:
        poly = polygraphy_backend()
        if poly is not None:
            route_polygraphy_logs()  # TensorRT's messages through polygraphy's logger stay off stdout
            _LOGGER = poly.get_trt_logger()
        else:
            _LOGGER = tensorrt_module().Logger(tensorrt_module().Logger.WARNING)
    return _LOGGER


def device_facts(device: torch.device) -> DeviceFacts:
    major, minor = torch.cuda.get_device_capability(device)
    return DeviceFacts(torch.cuda.get_device_name(device), f"{major}.{minor}")


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    trt = tensorrt_module()
    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
        trt.int8: torch.int8, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16,
    }  # fmt: skip
    return table[trt_dtype]


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make `device` current (TensorRT builds, loads and runs on the current CUDA device)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield
