"""TensorRT engines from the exported ONNX graphs: build, cache, load and run (TensorRT 10 Python API).

The pure parts (profiles, cache keys, staleness, engine choice, build flags) are plain functions over
dicts and strings, so they are tested without TensorRT. Everything that needs the library imports it
lazily through `_trt()`.

Engines per graph:
- UNets: a *static* engine for batch 1 at the working resolution (min = opt = max: the fastest kernels,
  and CUDA-graph replay), plus a *dynamic* one (batch 1..B, sides native/2..3*native/2) for everything
  else, e.g. the batch-2 CFG steps of a UNet without guidance distillation;
- VAE and text encoders: the dynamic engine only.
Shapes no engine covers (very thin photos) fall back to the torch UNet with a warning.

Engines live in `cache_root()/engines/<export key>/<graph>-<kind>-<key>.plan`, beside a JSON with their
full cache key: sha256 of (ONNX file hash, profile shapes, precision/build mode, TensorRT version, GPU
compute capability). A stale or foreign engine (another TensorRT, another GPU, another export) has a
different key and is never loaded; a file lock keeps two processes from building the same engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.errors import ICDError
from icdcli.export.files import file_lock
from icdcli.export.manifest import GUIDANCE_CFG, P2P_BATCH, UNET_GRAPHS, GraphSpec, Manifest

from .base import BackendParts, GraphDenoiser, ShapeNotCovered, assemble_parts

logger = logging.getLogger("icd")

STRONGLY_TYPED_SINCE = (10, 12)
"""From TensorRT 10.12 weakly typed fp16 (BuilderFlag.FP16) is deprecated: build strongly typed from fp16 ONNX."""
STATIC, DYNAMIC = "static", "dynamic"
Triple = tuple[int, int, int]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""Input name -> (min, opt, max) shapes: one TensorRT optimisation profile."""


# --- pure logic -------------------------------------------------------------------------------------------


def parse_version(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class BuildMode:
    strongly_typed: bool
    fp16_flag: bool

    @property
    def label(self) -> str:
        return "strongly-typed" if self.strongly_typed else ("fp16-flag" if self.fp16_flag else "fp32")


def build_mode(trt_version: str, onnx_precision: str) -> BuildMode:
    """How to get fp16 kernels: strongly typed from fp16 ONNX on TensorRT >= 10.12, else BuilderFlag.FP16.

    fp32 ONNX builds an fp32 engine (TF32 where the GPU has it).
    """
    if onnx_precision == "fp32":
        return BuildMode(strongly_typed=False, fp16_flag=False)
    if parse_version(trt_version)[:2] >= STRONGLY_TYPED_SINCE:
        return BuildMode(strongly_typed=True, fp16_flag=False)
    return BuildMode(strongly_typed=False, fp16_flag=True)


def round_to(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def spatial_range(native: int, multiple: int, requested: int | None = None) -> Triple:
    """(min, opt, max) pixels along one side: native/2 .. 3*native/2, opt the requested (or native) side."""
    opt = requested or native
    low = min(round_to(native // 2, multiple), opt)
    high = max(round_to(native * 3 // 2, multiple), opt)
    return low, opt, high


def axis_ranges(
    native: int, multiple: int, vae_scale_factor: int, height: int | None, width: int | None, max_batch: int,
    opt_batch: int, static: bool,
) -> dict[str, Triple]:  # fmt: skip
    """Ranges of every named axis of the exported graphs, for one engine kind."""
    h, w = spatial_range(native, multiple, height), spatial_range(native, multiple, width)
    if static:
        h, w = (h[1],) * 3, (w[1],) * 3
        batch = (1, 1, 1)
    else:
        batch = (1, max(1, min(opt_batch, max_batch)), max_batch)
    ranges = {"batch": batch, "height": h, "width": w}
    ranges["latent_height"] = tuple(v // vae_scale_factor for v in h)
    ranges["latent_width"] = tuple(v // vae_scale_factor for v in w)
    return ranges


def profile_shapes(spec: GraphSpec, ranges: dict[str, Triple]) -> Profile:
    """The optimisation profile of a graph: each symbolic dim replaced by its axis range."""
    profile: Profile = {}
    for tensor in spec.inputs:
        triple = [[dim] * 3 if isinstance(dim, int) else list(ranges[dim]) for dim in tensor.shape]
        profile[tensor.name] = tuple(tuple(column[i] for column in triple) for i in range(3))  # type: ignore[assignment]
    return profile


@dataclass(frozen=True)
class EngineRequest:
    graph: str
    kind: str
    profile: Profile


def plan_engines(
    manifest: Manifest, height: int | None = None, width: int | None = None, max_batch: int | None = None,
    static: bool = True,
) -> list[EngineRequest]:  # fmt: skip
    """Which engines to build: a static batch-1 engine per UNet (if `static`) and a dynamic one per graph."""
    info = manifest.info
    native, multiple = int(info["native_size"]), int(info["size_multiple"])
    cfg = any(spec.guidance == GUIDANCE_CFG for spec in manifest.graphs.values())
    max_batch = max_batch or (2 if cfg else 1)
    requests = []
    for name, spec in manifest.graphs.items():
        kinds = [STATIC, DYNAMIC] if static and name in UNET_GRAPHS else [DYNAMIC]
        for kind in kinds:
            opt_batch = 2 if spec.guidance == GUIDANCE_CFG and name != "forward_unet" else 1
            ranges = axis_ranges(
                native, multiple, manifest.vae_scale_factor, height, width, max_batch, opt_batch, kind == STATIC
            )
            ranges[P2P_BATCH] = (2, 4, 4) if cfg else (2, 2, 2)  # source + target rows (and real CFG's uncond)
            requests.append(EngineRequest(name, kind, profile_shapes(spec, ranges)))
    return requests


def engine_cache_key(
    onnx_sha256: str, profile: Profile, mode: BuildMode, trt_version: str, compute_capability: str
) -> str:
    """sha256 of everything an engine depends on: change any of them and the engine is rebuilt."""
    payload = {
        "onnx": onnx_sha256,
        "profile": {name: [list(shape) for shape in shapes] for name, shapes in sorted(profile.items())},
        "mode": asdict(mode),
        "tensorrt": trt_version,
        "compute_capability": compute_capability,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_file(folder: Path, request: EngineRequest, key: str) -> Path:
    return folder / f"{request.graph}-{request.kind}-{key[:16]}.plan"


def stale_reason(meta: dict[str, Any] | None, key: str) -> str | None:
    """Why a cached engine cannot be loaded (None: it can). The key covers TensorRT, GPU, ONNX and profile."""
    if meta is None:
        return "not built yet"
    if meta.get("key") != key:
        return "built from other inputs, TensorRT version or GPU"
    return None


def read_meta(plan: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(plan.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if plan.is_file() else None


def covers(profile: Profile, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether every input shape lies within the profile's [min, max]."""
    for name, shape in shapes.items():
        low, _, high = profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            return False
    return True


def choose_engine(candidates: list[tuple[str, Profile]], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Index of the engine to run these shapes: a static one that matches exactly, else a covering one."""
    order = sorted(range(len(candidates)), key=lambda i: candidates[i][0] != STATIC)
    return next((i for i in order if covers(candidates[i][1], shapes)), None)


# --- TensorRT ---------------------------------------------------------------------------------------------


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise ICDError("TensorRT is not installed: pip install 'icd[tensorrt]' (needs an NVIDIA GPU)") from error
    return tensorrt


def compute_capability(device: torch.device | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    trt = _trt()
    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
        trt.int8: torch.int8, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16,
    }  # fmt: skip
    return table[trt_dtype]


def make_progress_monitor(say: Callable[[str], None]) -> Any | None:
    """An IProgressMonitor that reports top-level build phases, or None on TensorRT without the interface."""
    trt = _trt()
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class PhaseMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.started[phase_name] = time.perf_counter()
                say(f"  TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            if phase_name in self.started:
                say(f"  TensorRT: {phase_name} done in {time.perf_counter() - self.started.pop(phase_name):.1f}s")

    return PhaseMonitor()


def build_engine(
    onnx_path: Path, plan: Path, profile: Profile, mode: BuildMode, timing_cache: Path | None,
    progress: Callable[[str], None] | None = None, workspace_bytes: int | None = None,
) -> None:  # fmt: skip
    """Parse the ONNX graph and write a serialized engine with one optimisation profile to `plan`."""
    trt = _trt()
    say = progress or (lambda message: None)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ICDError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if mode.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    monitor = make_progress_monitor(say)
    if monitor is not None:
        config.progress_monitor = monitor
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ICDError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    plan.parent.mkdir(parents=True, exist_ok=True)
    staging = plan.with_suffix(".partial")
    staging.write_bytes(bytes(serialized))
    staging.replace(plan)
    if timing_cache is not None:
        with file_lock(timing_cache.with_suffix(".lock")):
            updated = timing_cache.with_suffix(".partial")
            updated.write_bytes(bytes(config.get_timing_cache().serialize()))
            updated.replace(timing_cache)


def ensure_engine(
    onnx_path: Path, onnx_sha256: str, request: EngineRequest, mode: BuildMode, folder: Path, timing_cache: Path | None,
    progress: Callable[[str], None] | None = None,
) -> Path:  # fmt: skip
    """The engine file for `request`, built under a file lock when missing or stale."""
    trt = _trt()
    key = engine_cache_key(onnx_sha256, request.profile, mode, trt.__version__, compute_capability())
    plan = engine_file(folder, request, key)
    with file_lock(plan.with_suffix(".lock")):
        reason = stale_reason(read_meta(plan), key)
        if reason is not None:
            say = progress or (lambda message: None)
            say(f"building TensorRT engine {plan.name} ({request.kind}, {mode.label}; {reason})")
            logger.info("building TensorRT engine %s (%s)", plan.name, reason)
            build_engine(onnx_path, plan, request.profile, mode, timing_cache, progress)
            meta = {"key": key, "graph": request.graph, "kind": request.kind, "onnx_sha256": onnx_sha256,
                    "tensorrt": trt.__version__, "compute_capability": compute_capability(), "mode": mode.label,
                    "profile": {k: [list(s) for s in v] for k, v in request.profile.items()}}  # fmt: skip
            plan.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return plan


class Engine:
    """One TensorRT engine: load, create a context, allocate persistent torch CUDA buffers, infer.

    Inference runs on torch's current stream through `execute_async_v3` with `set_tensor_address`. For
    static engines, `cuda_graph=True` captures the enqueue once and replays it afterwards.
    """

    def __init__(self, path: Path, kind: str, profile: Profile, device: torch.device, cuda_graph: bool = False):
        self.path, self.kind, self.profile, self.device = path, kind, profile, device
        self.cuda_graph = cuda_graph and kind == STATIC
        self.engine: Any = None
        self.context: Any = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self) -> Engine:
        trt = _trt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ICDError(f"TensorRT cannot load {self.path}: delete it and run again to rebuild")
        self.context = self.engine.create_execution_context()
        return self

    def io_names(self) -> tuple[list[str], list[str]]:
        trt = _trt()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """(Re)allocate every I/O buffer for these input shapes and bind its address."""
        inputs, outputs = self.io_names()
        for name in inputs:
            self.context.set_input_shape(name, shapes[name])
        self.buffers = {}
        for name in inputs + outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch_dtype(self.engine.get_tensor_dtype(name))
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.shapes, self.graph = dict(shapes), None

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ICDError(f"TensorRT inference failed in {self.path.name}")

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in feeds.items()}
        if shapes != self.shapes:
            self.allocate(shapes)
        for name, tensor in feeds.items():
            self.buffers[name].copy_(tensor)
        stream = torch.cuda.current_stream(self.device)
        if self.graph is not None:
            self.graph.replay()
        elif self.cuda_graph:
            self._enqueue(stream)  # TensorRT needs one plain enqueue before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue(torch.cuda.current_stream(self.device))
            self.graph = graph
        else:
            self._enqueue(stream)
        _, outputs = self.io_names()
        return {name: self.buffers[name].clone() for name in outputs}


class TensorRTGraph:
    """The runner of one exported graph over its engines: picks the static or dynamic one per call."""

    def __init__(self, spec: GraphSpec, engines: list[Engine]):
        self.spec, self.engines = spec, engines

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {s.name: tuple(feeds[s.name].shape) for s in self.spec.inputs}
        index = choose_engine([(engine.kind, engine.profile) for engine in self.engines], shapes)
        if index is None:
            raise ShapeNotCovered(f"shapes {shapes} lie outside every TensorRT engine of {self.spec.name}")
        engine = self.engines[index]
        if engine.engine is None:
            engine.load()
        dtypes = {s.name: s.dtype for s in self.spec.inputs}
        from icdcli.export.onnx import TORCH_DTYPES

        typed = {n: feeds[n].to(engine.device, TORCH_DTYPES[dtypes[n]]) for n in shapes}
        return engine.infer(typed)


class TensorRTDenoiser(GraphDenoiser):
    """A TensorRT UNet engine behind the exact denoiser interface (see `GraphDenoiser`)."""

    backend = "tensorrt"


def engines_root() -> Path:
    from icdcli.models import cache_root

    return cache_root() / "engines"


def load_parts(
    folder: Path, manifest: Manifest, model: Any, fallbacks: dict[str, Any],
    progress: Callable[[str], None] | None = None, height: int | None = None, width: int | None = None,
    max_batch: int | None = None, static: bool = True, cuda_graph: bool = True,
) -> BackendParts:  # fmt: skip
    """Engines for every graph of an export folder, built on first use; TensorRT-run `BackendParts`."""
    trt = _trt()
    if model.device.type != "cuda":
        raise ICDError("--backend tensorrt needs the model on a CUDA device (--device cuda)")
    mode = build_mode(trt.__version__, manifest.precision)
    cache = engines_root() / manifest.model_key
    timing = engines_root() / f"timing-{trt.__version__}-sm{compute_capability().replace('.', '')}.cache"
    engines: dict[str, list[Engine]] = {}
    for request in plan_engines(manifest, height, width, max_batch, static):
        spec = manifest.graphs[request.graph]
        plan = ensure_engine(folder / spec.file, spec.sha256, request, mode, cache, timing, progress)
        engine = Engine(plan, request.kind, request.profile, model.device, cuda_graph)
        engines.setdefault(request.graph, []).append(engine)

    def make_runner(spec: GraphSpec) -> TensorRTGraph:
        return TensorRTGraph(spec, engines[spec.name])

    return assemble_parts("tensorrt", manifest, make_runner, TensorRTDenoiser, fallbacks)
