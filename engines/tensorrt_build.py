"""TensorRT engine builds: through polygraphy (TensorRT's own builder where polygraphy is missing), with the shared
tactic timing cache and a progress monitor, into the engine cache.

`ensure_engine` builds an engine when its file is missing or stale (the key: `tensorrt_plan.engine_cache_key`) under
a file lock, writes it atomically beside a JSON with its key and build time, and says before each build how long
earlier builds of that graph took here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icdcli.engines.base import BackendUnavailable
from icdcli.engines.tensorrt_lib import polygraphy_backend, tensorrt_module, trt_logger
from icdcli.engines.tensorrt_plan import (
    BUILD_FORMAT,
    BuildMode,
    DeviceFacts,
    EngineRequest,
    Profiles,
    engine_cache_key,
    engine_file,
    previous_build_seconds,
    read_meta,
    stale_reason,
)
from icdcli.export.cleanup import polygraphy_quiet
from icdcli.export.files import file_lock
from icdcli.io.atomic import atomic_path

logger = logging.getLogger("icd")


def make_progress_monitor(say: Callable[[str], None]) -> Any | None:
    """An IProgressMonitor that reports top-level build phases, or None on TensorRT without the interface."""
    trt = tensorrt_module()
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class PhaseMonitor(trt.IProgressMonitor):  # type: ignore[name-defined]  # the module is imported at run time
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


def build_with_polygraphy(
    poly: Any, onnx_path: Path, profiles: Profiles, *, mode: BuildMode, timing_cache: Path | None, monitor: Any,
    workspace_bytes: int | None,
) -> bytes:  # fmt: skip
    """Serialized engine bytes through polygraphy: network from the ONNX path, config with profiles, timing cache."""
    trt = tensorrt_module()
    network = poly.network_from_onnx_path(str(onnx_path), strongly_typed=mode.strongly_typed)
    trt_profiles = []
    for _, profile in profiles:
        built = poly.Profile()
        for name, (low, opt, high) in profile.items():
            built.add(name, min=low, opt=opt, max=high)
        trt_profiles.append(built)
    options: dict[str, Any] = {"profiles": trt_profiles}
    if hasattr(trt.BuilderFlag, "TF32"):  # TensorRT's default where it has the flag; polygraphy's default is off
        options["tf32"] = True
    if mode.fp16_flag:
        options["fp16"] = True
    if timing_cache is not None:
        options["load_timing_cache"] = str(timing_cache)
    if monitor is not None:
        options["progress_monitor"] = monitor
    if workspace_bytes:
        options["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace_bytes}
    config = poly.CreateConfig(**options)
    save = str(timing_cache) if timing_cache is not None else None
    return poly.engine_bytes_from_network(network, config=config, save_timing_cache=save)


def build_with_tensorrt(
    onnx_path: Path, profiles: Profiles, *, mode: BuildMode, timing_cache: Path | None, monitor: Any,
    workspace_bytes: int | None,
) -> bytes | None:  # fmt: skip
    """Serialized engine bytes through TensorRT's own builder (where polygraphy is not installed)."""
    trt = tensorrt_module()
    builder = trt.Builder(trt_logger())
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if mode.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    for _, profile in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimisation.set_shape(name, low, opt, high)
        if config.add_optimization_profile(optimisation) < 0:
            raise BackendUnavailable(f"TensorRT rejected an optimisation profile of {onnx_path.name}: {profile}")
    if monitor is not None:
        config.progress_monitor = monitor
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.info("TensorRT: the timing cache %s could not be used; building without it", timing_cache.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is not None and timing_cache is not None:
        with file_lock(timing_cache.with_suffix(".lock")):
            _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return None if serialized is None else bytes(serialized)


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)


def build_engine(
    onnx_path: Path, plan: Path, profiles: Profiles, *, mode: BuildMode, timing_cache: Path | None,
    progress: Callable[[str], None] | None = None, workspace_bytes: int | None = None,
) -> None:  # fmt: skip
    """Build an engine with these optimisation profiles and write it to `plan`; BackendUnavailable when it fails."""
    say = progress or (lambda message: None)
    monitor = make_progress_monitor(say)
    poly = polygraphy_backend()
    options: dict[str, Any] = {"mode": mode, "timing_cache": timing_cache, "monitor": monitor,
                               "workspace_bytes": workspace_bytes}  # fmt: skip
    serialized: bytes | None
    try:
        if poly is not None:
            with polygraphy_quiet():
                serialized = build_with_polygraphy(poly, onnx_path, profiles, **options)
        else:
            serialized = build_with_tensorrt(onnx_path, profiles, **options)
    except BackendUnavailable:
        raise
    except Exception as error:  # polygraphy reports failed builds as its own exception type
        reason = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
        raise BackendUnavailable(f"TensorRT could not build an engine from {onnx_path.name}: {reason}") from error
    if not serialized:
        raise BackendUnavailable(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    _write_atomically(plan, bytes(serialized))


def engine_plan(
    onnx_sha256: str, request: EngineRequest, *, mode: BuildMode, folder: Path, device: DeviceFacts
) -> tuple[str, Path]:
    """The cache key of the engine for `request` and the file it is (or would be) in."""
    key = engine_cache_key(
        onnx_sha256, request.profiles, mode=mode, trt_version=tensorrt_module().__version__, device=device
    )
    return key, engine_file(folder, request, key)


def is_cached(onnx_sha256: str, request: EngineRequest, *, mode: BuildMode, folder: Path, device: DeviceFacts) -> bool:
    """Whether a current engine for `request` is in the cache (loading it needs no build)."""
    key, plan = engine_plan(onnx_sha256, request, mode=mode, folder=folder, device=device)
    return stale_reason(read_meta(plan), key) is None


def ensure_engine(
    onnx_path: Path, onnx_sha256: str, request: EngineRequest, *, mode: BuildMode, folder: Path, device: DeviceFacts,
    timing_cache: Path | None, progress: Callable[[str], None] | None = None,
) -> Path:  # fmt: skip
    """The engine file for `request`, built under a file lock when missing or stale."""
    trt = tensorrt_module()
    key, plan = engine_plan(onnx_sha256, request, mode=mode, folder=folder, device=device)
    with file_lock(plan.with_suffix(".lock")):
        reason = stale_reason(read_meta(plan), key)
        if reason is None:
            return plan
        say = progress or (lambda message: None)
        before = previous_build_seconds(folder, request.graph)
        estimate = f"earlier builds of it here took up to {before:.0f}s" if before else "a first build takes minutes"
        say(f"building TensorRT engine {request.graph} ({mode.label}, {len(request.profiles)} profiles; {estimate})")
        logger.info("building TensorRT engine %s (%s)", plan.name, reason)
        started = time.perf_counter()
        build_engine(onnx_path, plan, request.profiles, mode=mode, timing_cache=timing_cache, progress=progress)
        seconds = time.perf_counter() - started
        say(f"built TensorRT engine {request.graph} in {seconds:.0f}s")
        meta = {
            "key": key, "graph": request.graph, "onnx_sha256": onnx_sha256, "tensorrt": trt.__version__,
            "device": device.name, "compute_capability": device.capability, "build_format": BUILD_FORMAT,
            "mode": mode.label, "build_seconds": round(seconds, 1),
            "profiles": {label: {k: [list(s) for s in v] for k, v in p.items()} for label, p in request.profiles},
        }  # fmt: skip
        _write_atomically(plan.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return plan
