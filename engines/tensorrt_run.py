"""Running TensorRT engines: `Engine` (load, one execution context per profile used, persistent buffers, a dedicated
stream, CUDA-graph replay) and `TensorRTGraph`, the runner of one graph with its fallbacks.

Every execution context is created without its own activation memory: one block, sized to the largest need of the
profiles that ran, serves them all (they run one at a time on one stream; `SharedActivations`). Each `Engine` owns the
`trt.Runtime` that deserialized it and releases contexts, engine, runtime in that order; every result TensorRT returns
is checked and a failure names the engine, tensor and shape. A failure after load (`EngineFailed`), and non-finite
outputs on the first call of a profile, drop the engine: that call and every later one of the graph run on the next
backend or PyTorch, with one note.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from icdcli.engines.base import BackendUnavailable, EngineFailed, GraphDenoiser, Runner, ShapeNotCovered
from icdcli.engines.tensorrt_lib import on_device, tensorrt_module, torch_dtype, trt_logger
from icdcli.engines.tensorrt_plan import EngineRequest, Profiles, Shape, choose_profile, is_static, outside_message
from icdcli.export.manifest import GraphSpec

logger = logging.getLogger("icd")


def _set_device_memory(context: Any, address: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(address, size)
    else:
        context.device_memory = address


def profile_memory_bytes(engine: Any, index: int) -> int:
    """Activation memory a context of `engine` needs on optimisation profile `index` (at that profile's largest
    shapes), as polygraphy's per-profile allocation reads it; the engine-wide maximum on TensorRT without it."""
    for name in ("get_device_memory_size_for_profile_v2", "get_device_memory_size_for_profile"):  # 10.1+, 10.0
        method = getattr(engine, name, None)
        if method is not None:
            return int(method(index))
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


class SharedActivations:
    """One block of activation memory for every execution context (they run one at a time on one stream).

    Each context is pointed at the block once its optimisation profile is chosen, and the block is sized to the
    largest need of the (engine, profile) pairs used so far, so profiles that never run (a batch-16 landscape one
    during a run of native-size edits) cost nothing. When a larger need arrives the block grows and every context is
    pointed at the new one (and `generation` changes, so captured CUDA graphs are dropped).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.block: torch.Tensor | None = None
        self.bindings: weakref.WeakSet[Binding] = weakref.WeakSet()  # not keeping contexts alive past their engine
        self.generation = 0

    @property
    def size(self) -> int:
        return 0 if self.block is None else self.block.numel()

    def attach(self, binding: Binding, needed: int, what: str) -> None:
        """Point `binding`'s context at the block, growing it (and re-pointing every context) when too small."""
        if needed > self.size:
            self._grow(needed, what)
        self.bindings.add(binding)
        _set_device_memory(binding.context, self.block.data_ptr() if self.block is not None else 0, self.size)

    def _grow(self, needed: int, what: str) -> None:
        previous = self.size
        if self.block is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no context may still run on the old block
        self.block = None  # freed before the larger one is allocated: never both at once
        try:
            self.block = torch.empty(needed, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as error:
            self.block = torch.empty(previous, dtype=torch.uint8, device=self.device) if previous else None
            self._repoint()
            raise BackendUnavailable(
                f"TensorRT engine {what}: {needed / 2**20:.0f} MiB of activation memory do not fit on the GPU"
            ) from error
        self._repoint()

    def _repoint(self) -> None:
        self.generation += 1
        address = self.block.data_ptr() if self.block is not None else 0
        for binding in self.bindings:
            _set_device_memory(binding.context, address, self.size)


class Streams:
    """The dedicated stream engines run on, ordered after torch's current stream and before its next work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def handle(self) -> int:
        return 0 if self.stream is None else int(self.stream.cuda_stream)

    @contextlib.contextmanager
    def running(self, inputs: Iterable[torch.Tensor]) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # torch's writes of the inputs come first
        for tensor in inputs:
            if tensor.is_cuda:
                tensor.record_stream(self.stream)  # not reused by torch before the engine has read it
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)  # torch's reads of the outputs come after


class Binding:
    """One execution context on one optimisation profile, with its shapes, I/O buffers and captured graph."""

    def __init__(self, context: Any, index: int):
        self.context, self.index = context, index
        self.shapes: dict[str, Shape] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.graph: Any = None
        self.graph_generation = -1
        self.runs = 0
        """Runs at the current shapes: dynamic profiles capture a CUDA graph once shapes repeat."""


class Engine:
    """One TensorRT engine: load (the runtime kept alive with it), one context per profile used, persistent
    torch buffers, inference on a dedicated stream, CUDA-graph replay on static profiles."""

    def __init__(
        self, path: Path, graph: str, profiles: Profiles, *, device: torch.device, memory: SharedActivations,
        streams: Streams, cuda_graph: bool = True,
    ):  # fmt: skip
        # released in this order when the Engine goes: contexts, then the engine, then the runtime that made it
        self.bindings: dict[int, Binding] = {}
        self.engine: Any = None
        self.runtime: Any = None
        self.path, self.graph, self.profiles, self.device = path, graph, profiles, device
        self.memory, self.streams = memory, streams
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, torch.dtype] = {}
        self.last_profile: int | None = None
        """Index of the profile the last call ran on."""

    def close(self) -> None:
        """Release in the order TensorRT requires: execution contexts, then the engine, then the runtime that
        deserialized it (destroying a runtime before its engines is undefined behaviour). Idempotent."""
        self.bindings.clear()
        self.engine = None
        self.runtime = None

    def __del__(self) -> None:
        self.close()

    def activation_bytes(self) -> dict[str, int]:
        """Activation memory each profile needs, by label, as the loaded engine reports it."""
        return {label: profile_memory_bytes(self.engine, i) for i, (label, _) in enumerate(self.profiles)}

    def load(self) -> Engine:
        trt = tensorrt_module()
        with on_device(self.device):
            self.runtime = trt.Runtime(trt_logger())
            if self.runtime is None:
                raise BackendUnavailable(f"TensorRT could not create a runtime for {self.graph}")
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT cannot load engine {self.path.name}: delete it to rebuild it")
        # asked once here, never per call
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        found = int(self.engine.num_optimization_profiles)
        if found != len(self.profiles):
            raise BackendUnavailable(f"TensorRT engine {self.path.name} has {found} profiles, not {len(self.profiles)}")
        return self

    def binding(self, index: int) -> Binding:
        """The context of profile `index`, created on first use without its own activation memory."""
        if index in self.bindings:
            return self.bindings[index]
        trt = tensorrt_module()
        with on_device(self.device):
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineFailed(
                    f"TensorRT could not create an execution context for {self.graph} (out of GPU memory?)"
                )
            label = self.profiles[index][0]
            if not context.set_optimization_profile_async(index, self.streams.handle):
                raise EngineFailed(f"TensorRT engine {self.graph}: cannot select optimisation profile {label}")
            binding = Binding(context, index)
            self.memory.attach(binding, profile_memory_bytes(self.engine, index), f"{self.graph} ({label})")
        self.bindings[index] = binding
        return binding

    def _bind_shapes(self, binding: Binding, shapes: dict[str, Shape]) -> None:
        """Set every input shape (checked), then allocate every buffer and set its address (checked).

        The profile was chosen because it holds these shapes, so a refusal is the engine's failure (EngineFailed),
        as are an unresolved output shape, a buffer that cannot be allocated and a refused address."""
        context = binding.context
        binding.shapes = {}  # nothing bound until every address is set
        for name in self.inputs:
            if not context.set_input_shape(name, shapes[name]):
                label = self.profiles[binding.index][0]
                raise EngineFailed(
                    f"TensorRT engine {self.graph}: input {name} shape {shapes[name]} is outside profile {label}"
                )
        buffers = {}
        for name in self.inputs + self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineFailed(f"TensorRT engine {self.graph}: tensor {name} has unresolved shape {shape}")
            try:
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            except torch.OutOfMemoryError as error:
                raise EngineFailed(
                    f"TensorRT engine {self.graph}: no GPU memory for tensor {name} of shape {shape}"
                ) from error
            if not context.set_tensor_address(name, buffers[name].data_ptr()):
                raise EngineFailed(f"TensorRT engine {self.graph}: cannot bind tensor {name} of shape {shape}")
        binding.shapes, binding.buffers, binding.graph, binding.runs = dict(shapes), buffers, None, 0

    def _enqueue(self, binding: Binding) -> None:
        if not binding.context.execute_async_v3(self.streams.handle):
            raise EngineFailed(f"TensorRT inference failed in engine {self.graph} at shapes {binding.shapes}")

    def _run(self, binding: Binding) -> None:
        """Replay the captured CUDA graph, or run once (and capture: at once on a static profile, on a dynamic
        one when the same shapes come a second time, as in every step of one edit)."""
        binding.runs += 1
        if binding.graph is not None and binding.graph_generation == self.memory.generation:
            binding.graph.replay()
            return
        self._enqueue(binding)  # also the plain run TensorRT needs before a capture
        if self.cuda_graph and (binding.runs >= 2 or is_static(self.profiles[binding.index][1])):
            binding.graph = self._capture(binding)
            binding.graph_generation = self.memory.generation

    def _capture(self, binding: Binding) -> Any:
        """A CUDA graph of one enqueue, or None (with a note, and no more tries) when capture fails."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.streams.stream):
                self._enqueue(binding)
        except Exception as error:  # capture fails for engines with host-synchronising layers, among others
            self.cuda_graph = False
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            logger.info("TensorRT engine %s runs without CUDA-graph replay: capture failed (%s)", self.graph, reason)
            return None
        return graph

    def infer(self, feeds: dict[str, torch.Tensor], borrowed: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Outputs for `feeds` (each copied into the engine's input buffer, converted to its dtype on the way).

        Outputs named in `borrowed` are the engine's own buffers, returned without a copy: they are overwritten by
        the next call of this engine at the same shapes, so the caller must consume them (or clone them) before.
        The other outputs are copies the caller may keep.
        """
        if self.engine is None:
            self.load()
        shapes = {name: tuple(feeds[name].shape) for name in self.inputs}
        index = choose_profile(self.profiles, shapes)
        if index is None:
            raise ShapeNotCovered(outside_message(self.graph, self.profiles, shapes))
        self.last_profile = index
        with on_device(self.device):
            binding = self.binding(index)
            if shapes != binding.shapes:
                self._bind_shapes(binding, shapes)
            with self.streams.running(feeds[name] for name in self.inputs):
                for name in self.inputs:
                    binding.buffers[name].copy_(feeds[name], non_blocking=True)
                self._run(binding)
        keep = set(borrowed)
        return {name: binding.buffers[name] if name in keep else binding.buffers[name].clone() for name in self.outputs}


class TensorRTGraph:
    """The runner of one exported graph: builds its engine when first called, converts inputs, runs it.

    `requests` are the engines it may build, narrowest first (with NATIVE_FIRST: one profile at the working size,
    then every profile). A call whose shapes the loaded engine does not hold builds the narrowest one that does; the
    old engine is closed once the new one is built (a build that fails leaves it serving the shapes it holds). Where
    the widest engine is already in the cache (`is_built`) it serves from the first call.

    Where TensorRT cannot run a call it goes to the next backend, `make_next()` (ONNX Runtime's CUDA provider where
    installed), with a note; without one it raises BackendUnavailable and the caller falls back to PyTorch. Shapes
    outside every profile, or activation memory that does not fit, concern that call only. A failure of the engine
    itself - to build or load, or after load (`EngineFailed`: a refused profile, shape or address, an unresolved
    shape, a failed allocation or enqueue, any RuntimeError of a run, non-finite outputs on its first call) - is
    recorded in `failure`, the engine is dropped, and this call and every later one go to the next backend.
    """

    def __init__(
        self, spec: GraphSpec, make_engine: Callable[[EngineRequest], Engine], requests: Sequence[EngineRequest], *,
        borrowed: tuple[str, ...] = (), make_next: Callable[[], Runner] | None = None,
        is_built: Callable[[EngineRequest], bool] | None = None, nan_hint: str = "",
    ):  # fmt: skip
        if not requests:
            raise ValueError(f"{spec.name}: no engine to build")
        self.spec, self.make_engine, self.requests = spec, make_engine, tuple(requests)
        self.borrowed, self.make_next, self.nan_hint = borrowed, make_next, nan_hint
        self.is_built: Callable[[EngineRequest], bool] = is_built or (lambda request: False)
        self.engine: Engine | None = None
        self.stage = 0
        """Index in `requests` of the engine loaded (or to load first)."""
        self.checked: set[int | None] = set()
        """Profiles of the loaded engine whose outputs were found finite (the first call on each is checked)."""
        self.failure: BackendUnavailable | None = None
        self.widen_failure: BackendUnavailable | None = None
        self.next: Runner | None = None

    def _shapes(self, feeds: dict[str, torch.Tensor]) -> dict[str, Shape]:
        return {tensor.name: tuple(feeds[tensor.name].shape) for tensor in self.spec.inputs}

    def _stage_for(self, shapes: dict[str, Shape]) -> int:
        """The narrowest engine from the current one on whose profiles hold `shapes`; the current one when none does
        (its run then says what lies outside)."""
        for index in range(self.stage, len(self.requests)):
            if choose_profile(self.requests[index].profiles, shapes) is not None:
                return index
        return self.stage

    def _drop(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _open(self, index: int) -> Engine:
        """Build (or find) engine `index`, then close the one loaded and load it."""
        fresh = self.make_engine(self.requests[index])  # the build: the loaded engine stays until it is done
        self._drop()
        self.stage, self.checked = index, set()
        try:
            self.engine = fresh.load()
        except BackendUnavailable as error:
            self.failure = error
            raise
        return self.engine

    def _engine(self, shapes: dict[str, Shape]) -> Engine:
        if self.failure is not None:
            raise self.failure
        if self.engine is None:
            last = len(self.requests) - 1
            if self.stage < last and self.is_built(self.requests[last]):
                self.stage = last  # every profile is built already: no narrower build first
            try:
                return self._open(self._stage_for(shapes))
            except BackendUnavailable as error:
                self.failure = error  # a failed build is not tried again
                raise
        index = self._stage_for(shapes)
        if index == self.stage:
            return self.engine
        if self.widen_failure is not None:
            raise self.widen_failure
        say = f"TensorRT engine {self.spec.name}: building its other profiles for input shapes {shapes}"
        logger.info("%s", say)
        try:
            return self._open(index)
        except BackendUnavailable as error:
            if self.engine is not None:  # the wider build failed: the engine loaded serves what it holds
                self.widen_failure = error
            raise

    def _failure_of(self, error: Exception) -> EngineFailed:
        """The failure this graph keeps for `error` of its loaded engine: a new exception with the message alone.
        The original's traceback holds frames that saw the engine's contexts; were it kept (or alive while the
        engine is dropped), the contexts would outlive the runtime that made them."""
        if isinstance(error, EngineFailed):
            return EngineFailed(str(error))
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        return EngineFailed(f"TensorRT engine {self.spec.name} failed at run time: {reason}")

    def _check_finite(self, outputs: dict[str, torch.Tensor], profile: str) -> None:
        for name, tensor in outputs.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise EngineFailed(
                    f"TensorRT engine {self.spec.name} gave non-finite values (NaN/Inf) in {name} on its first call "
                    f"of profile {profile}; "
                    f"{self.nan_hint or 'an fp16 export can keep normalisation in fp32: --fp32-norm'}"
                )

    def _run_engine(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self._engine(self._shapes(feeds))
        try:
            outputs = engine.infer(feeds, self.borrowed)  # the input copy converts device and dtype
            if engine.last_profile not in self.checked:  # one sync per profile, not per step
                self._check_finite(outputs, engine.profiles[engine.last_profile or 0][0])
                self.checked.add(engine.last_profile)
        except (EngineFailed, RuntimeError) as error:  # torch's OutOfMemoryError is a RuntimeError
            failure = self._failure_of(error)
        else:
            return outputs
        # out of the handler: the original error and its traceback are gone, the engine can be released in order
        del engine
        self.failure = failure
        self._drop()
        raise failure

    def _next_backend(self, error: BackendUnavailable) -> Runner:
        if self.next is None:
            assert self.make_next is not None, "called only while a next backend is known"
            try:
                self.next = self.make_next()
            except Exception as next_error:  # the next backend cannot load it either: PyTorch it is
                self.make_next = None
                raise error from next_error
            logger.warning("%s: %s runs on ONNX Runtime (CUDA) where TensorRT cannot", error, self.spec.name)
        return self.next

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self._run_engine(feeds)
        except BackendUnavailable as error:
            if self.make_next is None:
                raise
            return self._next_backend(error)(feeds)


class TensorRTDenoiser(GraphDenoiser):
    """A TensorRT UNet engine behind the exact denoiser interface (see `GraphDenoiser`)."""

    backend = "tensorrt"
