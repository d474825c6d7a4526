"""The machine `icd bench gpu` runs on: what it is (device, driver, versions) and which accelerated backends it has,
timing on its device between synchronisations, and the run's time budget (`--time-limit`)."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from icdcli.bench.scale import GB


class TimeLimitReached(BaseException):  # noqa: N818 - not an error: the run's time is up
    """Raised inside a step when `--time-limit` runs out (a BaseException, so no library swallows it)."""


class Budget:
    """The run's time: what is left of `--time-limit`, whether a step of some estimated length fits, and an alarm
    that interrupts a step running past the limit (main thread, POSIX only; `interrupt=False` turns it off)."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.perf_counter, interrupt: bool = True):
        self.limit, self.clock = limit, clock
        self.start = clock()
        self.interrupt = (
            interrupt and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        )

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.limit - self.elapsed()

    def refuses(self, estimate: float) -> str | None:
        """Why a step of about `estimate` seconds must be skipped, or None when it fits."""
        elapsed, left = self.elapsed(), self.left()
        if left <= 0 or estimate > left:
            return (
                f"time limit: {elapsed:.0f} s of --time-limit {self.limit:g} s used, "
                f"this step needs about {estimate:.0f} s"
            )
        return None

    @contextmanager
    def alarm(self) -> Iterator[None]:
        """Raise TimeLimitReached inside the block when the limit passes."""
        if not self.interrupt:
            yield
            return

        def ring(signum: int, frame: Any) -> None:
            raise TimeLimitReached()

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, or None where there is none."""
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = found.stdout.strip().splitlines()
    return lines[0].strip() if found.returncode == 0 and lines else None


def machine_facts(device: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(device name, device details, versions). On a CPU device nothing asks CUDA anything."""
    import torch

    from icdcli import __version__

    versions: dict[str, Any] = {
        "icd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
    }
    if device.type != "cuda":
        from icdcli.bench.latency import device_description

        return "cpu", {"description": device_description(device), "threads": torch.get_num_threads()}, versions
    versions["cudnn"] = torch.backends.cudnn.version()
    versions["driver"] = _driver()
    props = torch.cuda.get_device_properties(device)
    details = {
        "name": props.name,
        "memory_gb": round(props.total_memory / GB, 2),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
    }
    return props.name, details, versions


def backend_presence(device: Any) -> dict[str, dict[str, Any]]:
    """TensorRT and ONNX Runtime's CUDA provider: present or absent here (and why). This bench times PyTorch only."""
    from icdcli.backends.accelerated import backend_problem, probe_backends

    facts = probe_backends(device)
    untimed = "present, not timed here (icd bench gpu times PyTorch): icd bench scale --device cuda --backends {} does"
    not_gpu = "the device is not a CUDA GPU (--device cuda)"
    if not facts.cuda:
        tensorrt: str | None = not_gpu
    elif not (facts.tensorrt and facts.onnx):
        tensorrt = backend_problem("tensorrt", facts)
    else:
        tensorrt = None
    if facts.onnxruntime_cuda:
        ort: str | None = None
    elif not facts.onnxruntime:
        ort = "onnxruntime is not installed: pip install onnxruntime-gpu"
    elif not facts.cuda:
        ort = not_gpu
    else:
        ort = "onnxruntime has no CUDAExecutionProvider here (the CPU build): pip install onnxruntime-gpu"
    found = {"tensorrt": tensorrt, "onnxruntime_cuda": ort}
    return {
        name: {"status": "absent", "reason": problem}
        if problem
        else {"status": "present", "reason": untimed.format(name.removesuffix("_cuda"))}
        for name, problem in found.items()
    }


class Clocked:
    """Synchronised timing on one device: `sync()` waits for its queued kernels; peak memory per row on CUDA."""

    def __init__(self, device: Any):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / GB, 3)

    def allocated_gb(self) -> float | None:
        """What the device holds allocated now (the weights, between rows)."""
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.memory_allocated(self.device) / GB, 3)

    def free(self) -> None:
        """Return freed memory to the device: best effort, never an error of its own (it runs in cleanups)."""
        gc.collect()
        if self.cuda:
            import torch

            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def seconds(self, run: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - start
