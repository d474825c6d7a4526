"""How PyTorch runs a model's UNets: eagerly, replayed from CUDA graphs, or compiled with `torch.compile`.

An iCD edit is eight UNet calls at batch 1: on a fast GPU each call is bound by the CPU launching several hundred
kernels, not by the kernels. A CUDA graph records one call's kernels once and replays them with one launch. What a
graph replays is fixed at capture: the same kernels on the same memory. So every call signature (the shapes and
dtypes of its inputs, and the Python-side choices the network makes, such as which attention layers a P2P step
edits) gets its own graph, with static input buffers the call's tensors are copied into and static outputs that
are copied out after the replay. All graphs of a model share one memory pool.

The capture itself is a seam (`Capture`): on CUDA it is `torch.cuda.graph`; `eager_replay` is a stand-in with the
same contract (outputs are static tensors overwritten by each replay, inputs are read only from the static
buffers) that runs on any device, so the bookkeeping is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

logger = logging.getLogger("icd")

Tensors = dict[str, torch.Tensor]
Outputs = tuple[torch.Tensor, ...]
Run = Callable[[Tensors], Outputs]
"""One network call over named input tensors, returning its output tensors."""
Captured = tuple[Callable[[], None], Outputs]
"""What a capture returns: (replay, static outputs)."""


@dataclass(frozen=True)
class TorchExecution:
    """How the PyTorch UNets run. `cuda_graphs` and `compile` take effect on CUDA only; `channels_last` stores the
    UNets' convolution weights in NHWC order (faster convolutions on tensor cores)."""

    cuda_graphs: bool = False
    compile: bool = False
    channels_last: bool = False
    MODES: ClassVar[tuple[str, ...]] = ("eager", "graphs", "compile")

    @classmethod
    def from_mode(cls, mode: str) -> TorchExecution:
        """`eager`, `graphs` (CUDA graphs) or `compile` (`torch.compile`)."""
        if mode not in cls.MODES:
            raise ValueError(f"unknown execution mode {mode!r}: expected one of {', '.join(cls.MODES)}")
        return cls(cuda_graphs=mode == "graphs", compile=mode == "compile")

    @property
    def mode(self) -> str:
        return "graphs" if self.cuda_graphs else "compile" if self.compile else "eager"


class Capture(Protocol):
    def __call__(
        self, run: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
        """Record `run` (a call that reads only static buffers); return (replay, static outputs): each replay
        reruns the recorded call and leaves its results in the static outputs."""
        ...


def eager_replay(run: Callable[[], Outputs]) -> Captured:
    """A `Capture` without a GPU: the outputs of a first run are the static outputs; a replay runs again and
    overwrites them in place, as a graph replay does."""
    outputs = run()

    def replay() -> None:
        for static, fresh in zip(outputs, run(), strict=True):
            static.copy_(fresh)

    return replay, outputs


class CudaGraphCapture:
    """`torch.cuda.graph` capture on one device: warm-up runs on a side stream first (kernel selection and the
    allocator settle outside the graph), then the capture into the memory pool all of this object's graphs share."""

    WARMUP_RUNS = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.pool: Any = None

    def __call__(
        self, run: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        return graph.replay, outputs


def input_signature(inputs: Tensors) -> tuple[Hashable, ...]:
    """What a graph is specific to in its inputs: names, shapes, dtypes and devices (not values)."""
    return tuple((name, tuple(t.shape), t.dtype, str(t.device)) for name, t in sorted(inputs.items()))


@dataclass
class _Graph:
    inputs: Tensors
    replay: Callable[[], None]
    outputs: Outputs


@dataclass
class GraphedCalls:
    """One network's calls replayed from captured graphs, one graph per call signature (at most `limit`, the least
    recently used dropped first).

    A signature whose capture fails runs as plain calls from then on, and `note` says so once. Graphs hold the
    addresses of the network's weights: whoever frees or moves the network drops this object with it.
    """

    capture: Capture
    name: str = "unet"
    note: Callable[[str], None] = logger.info
    limit: int = 16
    graphs: OrderedDict[Hashable, _Graph] = field(default_factory=OrderedDict)
    failed: set[Hashable] = field(default_factory=set)
    captures: int = 0
    replays: int = 0

    def __call__(self, static: Hashable, inputs: Tensors, run: Run) -> Outputs:
        """`run(inputs)`, from a graph of (`static`, the inputs' signature): captured on its first call.

        `static` names what else the call's kernels depend on (Python-side choices inside `run`)."""
        key = (static, input_signature(inputs))
        if key in self.failed:
            return run(inputs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, inputs, run)
            if graph is None:
                return run(inputs)
        else:
            self.graphs.move_to_end(key)
            for name, tensor in inputs.items():
                graph.inputs[name].copy_(tensor)
        graph.replay()
        self.replays += 1
        return tuple(output.clone() for output in graph.outputs)

    def _capture(self, key: Hashable, inputs: Tensors, run: Run) -> _Graph | None:
        buffers = {name: tensor.clone() for name, tensor in inputs.items()}
        try:
            replay, outputs = self.capture(lambda: run(buffers))
        except Exception as error:  # any capture failure: this signature runs plain calls, the edit goes on
            self.failed.add(key)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.note(f"CUDA graphs: capturing a {self.name} call failed ({reason[:200]}); it runs as plain calls")
            return None
        self.captures += 1
        graph = _Graph(buffers, replay, tuple(outputs))
        self.graphs[key] = graph
        while len(self.graphs) > self.limit:
            self.graphs.popitem(last=False)
        return graph


@dataclass
class CompiledCalls:
    """A network compiled with `torch.compile` (static shapes): each new input signature compiles on its first
    call, whose seconds `note` reports."""

    module: torch.nn.Module
    name: str = "unet"
    note: Callable[[str], None] = logger.info
    backend: str = "inductor"
    compiled: Any = None
    seen: set[Hashable] = field(default_factory=set)

    def __call__(
        self, inputs: Tensors, run: Callable[[Any, Tensors], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        if self.compiled is None:
            configure_compile_cache()
            self.compiled = torch.compile(self.module, dynamic=False, backend=self.backend)
        key = input_signature(inputs)
        if key in self.seen:
            return run(self.compiled, inputs)
        start = time.perf_counter()
        outputs = run(self.compiled, inputs)
        self.seen.add(key)
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in sorted(inputs.items()) if t.ndim > 1)
        self.note(f"torch.compile: the {self.name} compiled for {shapes} in {time.perf_counter() - start:.1f} s")
        return outputs


def configure_compile_cache() -> None:
    """Keep torch.compile's caches under icd's cache folder (unless the user chose a place for them)."""
    import os

    from icdcli.core.paths import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "torch-compile"))
