"""The TensorRT backend: `BackendParts` whose graphs run on TensorRT engines built from an `icd export` folder.

Written against the TensorRT 10.x–11.x Python API and polygraphy's TensorRT backend, in four parts:
`tensorrt_plan` (profiles, shapes, cache keys, staleness, build mode: plain functions, tested without TensorRT),
`tensorrt_lib` (the library, imported lazily, and its one logger), `tensorrt_build` (builds and the engine cache) and
`tensorrt_run` (`Engine`, and `TensorRTGraph`, the runner of one graph with its fallbacks). This module wires them.

Engines are built when first needed (a command builds only the graphs it runs). By default (NATIVE_FIRST) a graph's
first engine has one profile, at the working size for the batch one call needs, and the engine with every profile
is built (and replaces it) when a call first needs another shape; `icd export --backend tensorrt` builds every
profile ahead (ALL_PROFILES). Engines live in `cache_root()/engines/<export key>/<graph>-<key>.plan`, beside a JSON
with their full cache key (`tensorrt_plan.engine_cache_key`); a file lock keeps two processes from building one
engine. None of this has run on real TensorRT: the contracts are checked with the fake module of
tests/fake_tensorrt.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from icdcli.core.errors import ICDError
from icdcli.core.paths import cache_root, mark_used
from icdcli.engines.base import BackendParts, Runner, assemble_parts
from icdcli.engines.tensorrt_build import ensure_engine, is_cached
from icdcli.engines.tensorrt_lib import device_facts, on_device, tensorrt_module
from icdcli.engines.tensorrt_plan import (
    AUTO_BATCH,
    NATIVE_FIRST,
    PROFILE_MODES,
    RULE_BYTES_PER_POSITION,
    DeviceFacts,
    EngineRequest,
    EngineSizes,
    MemoryBudget,
    build_mode,
    plan_engines,
    timing_cache_file,
)
from icdcli.engines.tensorrt_run import Engine, SharedActivations, Streams, TensorRTDenoiser, TensorRTGraph
from icdcli.export.manifest import REVERSE_P2P, UNET_GRAPHS, GraphSpec, Manifest, read_engine_sizes


def engines_root() -> Path:
    return cache_root() / "engines"


def resolve_sizes(folder: Path, *, height: int | None, width: int | None, max_batch: int | str | None) -> EngineSizes:
    """The sizes to build for: those given, else those the export was built for (`icd export --height ...`).
    A batch of AUTO_BATCH leaves it to the device's memory (`device_budget`)."""
    if height or width or max_batch:
        return EngineSizes(height, width, max_batch)
    return EngineSizes.from_json(read_engine_sizes(folder))


def export_weight_bytes(folder: Path, manifest: Manifest) -> int:
    """Bytes of every graph's weights in an export (its ONNX files and their external data): what its engines
    hold resident, near enough, before any engine is built."""
    files = [folder / spec.file for spec in manifest.graphs.values()]
    files += [folder / spec.external_data for spec in manifest.graphs.values() if spec.external_data]
    return sum(path.stat().st_size for path in files if path.is_file())


def device_budget(device: torch.device, folder: Path, manifest: Manifest) -> MemoryBudget:
    """The memory budget for profiles of this export on this GPU (its total memory, so the plan is stable)."""
    total = int(torch.cuda.get_device_properties(device).total_memory)
    per_position = RULE_BYTES_PER_POSITION.get(manifest.precision, RULE_BYTES_PER_POSITION["fp32"])
    return MemoryBudget(total, export_weight_bytes(folder, manifest), per_position)


def load_parts(
    folder: Path, manifest: Manifest, model: Any, *, fallbacks: dict[str, Any],
    progress: Callable[[str], None] | None = None, height: int | None = None, width: int | None = None,
    max_batch: int | str | None = None, cuda_graph: bool = True, build_now: Iterable[str] = (),
    profiles: str = NATIVE_FIRST,
) -> BackendParts:  # fmt: skip
    """TensorRT-run `BackendParts` for an export folder, on the model's CUDA device (see `engine_parts`).

    Args:
        max_batch: images per network call the profiles hold; AUTO_BATCH: as many as the GPU's memory allows for
            each profile's size (up to MAX_BATCH); None: the export's recorded batch, else DEFAULT_BATCH.
        profiles: NATIVE_FIRST (one profile at the working size first, the others when needed) or ALL_PROFILES.
    """
    tensorrt_module()
    device = model.device
    if device.type != "cuda":
        raise ICDError("--backend tensorrt needs the model on a CUDA device (--device cuda)")
    sizes = resolve_sizes(folder, height=height, width=width, max_batch=max_batch)
    budget = device_budget(device, folder, manifest) if sizes.batch == AUTO_BATCH else None
    return engine_parts(
        folder, manifest, device, facts=device_facts(device), fallbacks=fallbacks, sizes=sizes, progress=progress,
        cuda_graph=cuda_graph, build_now=build_now, next_backend=onnxruntime_next(folder, manifest, device),
        budget=budget, profiles=profiles,
    )  # fmt: skip


def onnxruntime_next(folder: Path, manifest: Manifest, device: torch.device) -> Callable[[GraphSpec], Runner] | None:
    """ONNX Runtime sessions on the CUDA provider, the backend after TensorRT, where onnxruntime-gpu is installed."""
    from icdcli.engines import onnxruntime as ort_engine

    if not ort_engine.has_cuda_provider():
        return None

    def make(spec: GraphSpec) -> Runner:
        return ort_engine.OrtGraph(folder / spec.file, spec, device=device, vae_scale_factor=manifest.vae_scale_factor)

    return make


def nan_hint(manifest: Manifest) -> str:
    """What to do about an engine of this export that gives NaN/Inf (the note names --fp32-norm)."""
    if manifest.precision != "fp16":
        return "the export is fp32 (--fp32-norm concerns fp16 exports): run it on PyTorch or ONNX Runtime"
    if manifest.fp32_norm:
        return "its export already keeps normalisation and the P2P softmax in fp32 (--fp32-norm)"
    return "export again with normalisation in fp32: icd export --backend tensorrt --fp16 --fp32-norm --force"


def engine_parts(
    folder: Path, manifest: Manifest, device: torch.device, *, facts: DeviceFacts, fallbacks: dict[str, Any],
    sizes: EngineSizes = EngineSizes(), progress: Callable[[str], None] | None = None, cuda_graph: bool = True,
    build_now: Iterable[str] = (), next_backend: Callable[[GraphSpec], Runner] | None = None,
    budget: MemoryBudget | None = None, profiles: str = NATIVE_FIRST,
) -> BackendParts:  # fmt: skip
    """`BackendParts` whose graphs run on TensorRT engines. Each engine is built (or found in the cache) when its
    graph first runs, so a command builds only what it uses; `build_now` names graphs to build before returning (their
    first engine: with NATIVE_FIRST the one-profile one). `next_backend(spec)` makes the runner a graph falls back to
    where TensorRT cannot run it (else PyTorch). `profiles`: see PROFILE_MODES."""
    if profiles not in PROFILE_MODES:
        raise ICDError(f"unknown TensorRT profile mode {profiles!r}: choose one of {', '.join(PROFILE_MODES)}")
    trt = tensorrt_module()
    mode = build_mode(trt.__version__, manifest.precision)
    cache = engines_root() / manifest.model_key
    if cache.is_dir():
        mark_used(cache)  # `icd cache prune` goes by last use
    timing = timing_cache_file(engines_root(), trt.__version__, facts)

    def planned(native_only: bool) -> dict[str, EngineRequest]:
        requests = plan_engines(
            manifest, height=sizes.height, width=sizes.width, max_batch=sizes.fixed_batch, budget=budget,
            native_only=native_only,
        )  # fmt: skip
        return {r.graph: r for r in requests}

    full = planned(False)
    first = planned(True) if profiles == NATIVE_FIRST else full
    memory, streams = SharedActivations(device), Streams(device)
    hint = nan_hint(manifest)

    def stages(name: str) -> list[EngineRequest]:
        return [full[name]] if first[name].profiles == full[name].profiles else [first[name], full[name]]

    def ensure(spec: GraphSpec, request: EngineRequest) -> Path:
        with on_device(device):
            return ensure_engine(
                folder / spec.file, spec.sha256, request, mode=mode, folder=cache, device=facts, timing_cache=timing,
                progress=progress,
            )  # fmt: skip

    def make_runner(spec: GraphSpec) -> TensorRTGraph:
        def make_engine(request: EngineRequest) -> Engine:
            return Engine(
                ensure(spec, request), spec.name, request.profiles, device=device, memory=memory, streams=streams,
                cuda_graph=cuda_graph,
            )  # fmt: skip

        def is_built(request: EngineRequest) -> bool:
            return is_cached(spec.sha256, request, mode=mode, folder=cache, device=facts)

        make_next = None if next_backend is None else (lambda: next_backend(spec))
        borrowed = ("eps",) if spec.name in (*UNET_GRAPHS, REVERSE_P2P) else ()  # eps is consumed by the step
        return TensorRTGraph(
            spec, make_engine, stages(spec.name), borrowed=borrowed, make_next=make_next, is_built=is_built,
            nan_hint=hint,
        )  # fmt: skip

    parts = assemble_parts("tensorrt", manifest, make_runner, denoiser_class=TensorRTDenoiser, fallbacks=fallbacks)
    for name in build_now:
        ensure(manifest.graphs[name], stages(name)[0])
    return parts
