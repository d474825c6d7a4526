"""TensorRT engines from the exported ONNX graphs: plan, build (through polygraphy), cache, load and run.

Written against the TensorRT 10.x–11.x Python API and polygraphy's TensorRT backend. The pure parts (profiles,
cache keys, staleness, profile choice, build flags) are plain functions over dicts and strings, tested without
TensorRT; everything that needs the library imports it lazily through `_trt()`.

One engine per graph, with one optimisation profile per kind of shape it must run:
- UNets: `native` - batch 1 at the working size (min = opt = max: the fastest kernels, CUDA-graph replay at once) -
  `batched`, the working size at 1..N images, then `landscape` and `portrait`, which together hold every size
  `icdcli.io.images.fit_size` gives a photo of aspect up to `MAX_ASPECT`, at 1..N images (two rows each for real CFG);
- VAE: `landscape` and `portrait`; text encoders and the P2P graph: their one shape.
N is the batch asked for, else DEFAULT_BATCH, or with AUTO_BATCH what the GPU's memory allows (`MemoryBudget`).
Photos thinner than `MAX_ASPECT` (and any shape outside every profile) run on PyTorch with a note.

Engines are built when first needed (a command builds only the graphs it runs). By default (NATIVE_FIRST) a graph's
first engine has one profile, at the working size for the batch one call needs, and the engine with every profile
above is built (and replaces it) when a call first needs another shape; `icd export --backend tensorrt` builds every
profile ahead (ALL_PROFILES). Engines live in
`cache_root()/engines/<export key>/<graph>-<key>.plan`, beside a JSON with their full cache key: sha256 of
(ONNX hash, profiles, build mode, TensorRT version, GPU name and compute capability, `BUILD_FORMAT`). A foreign
or stale engine has another key and is never loaded; a file lock keeps two processes from building one engine.

At run time every execution context is created without its own activation memory: one block, sized to the largest
need of the profiles that ran, serves them all (they run one at a time on one stream). Each `Engine` owns the
`trt.Runtime` that deserialized it and releases contexts, engine, runtime in that order; every result TensorRT
returns is checked and a failure names the engine, tensor and shape. A failure after load (`EngineFailed`), and
non-finite outputs on the first call of a profile, drop the engine: that call and every later one of the graph run
on the next backend or PyTorch, with one note. None of this has run on real TensorRT: the contracts are checked with
the fake module of tests/fake_tensorrt.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.core.digests import json_sha256
from icdcli.core.errors import ICDError
from icdcli.engines.base import (
    BackendParts,
    BackendUnavailable,
    EngineFailed,
    GraphDenoiser,
    Runner,
    ShapeNotCovered,
    assemble_parts,
)
from icdcli.export.files import file_lock
from icdcli.export.manifest import (
    FORWARD,
    GUIDANCE_CFG,
    P2P_BATCH,
    P2P_PAIRS,
    REVERSE_P2P,
    UNET_GRAPHS,
    GraphSpec,
    Manifest,
)

logger = logging.getLogger("icd")

BUILD_FORMAT = 2
"""Bump when how engines are built changes (profiles, flags): every cached engine and timing cache is rebuilt."""
STRONGLY_TYPED_SINCE = (10, 12)
"""From TensorRT 10.12 weakly typed fp16 (BuilderFlag.FP16) is deprecated, and TensorRT 11 removes it: build strongly
typed, so each layer runs in the precision the ONNX graph gives it."""
MAX_ASPECT = 4.0
"""Profiles hold every working size of photos up to this aspect ratio (either way round)."""
NATIVE, BATCHED, LANDSCAPE, PORTRAIT, ONLY = "native", "batched", "landscape", "portrait", "only"
NATIVE_FIRST, ALL_PROFILES = "native-first", "all"
PROFILE_MODES = (NATIVE_FIRST, ALL_PROFILES)
"""How a graph's engine is first built. `native-first`: one profile at the working size holding the images one call
needs (`native_profiles`), so a first edit waits for a one-profile build per graph; the engine with every profile is
built when a call first needs another shape (and replaces it). `all`: every profile at once (`icd export`)."""
DEFAULT_BATCH = 2
AUTO_BATCH = "auto"
"""Images per network call the dynamic profiles hold when no batch is asked for."""
MAX_BATCH = 16
"""The most images per call a batch derived from the device's memory goes to."""
MEMORY_HEADROOM = 0.8
"""Share of the device's memory the weights and one engine's activations may take (torch and the CUDA context need
the rest)."""
RULE_BYTES_PER_POSITION = {"fp16": 64 * 1024, "fp32": 128 * 1024}
"""Assumed activation memory of one image per latent position of a UNet engine, by precision, where no engine has
told its own (`Engine.activation_bytes`). A rule, not a measurement: it allows a few hundred live feature maps of
320-1280 channels per position, i.e. fused attention; an engine without fused attention needs more at large sizes."""
STATIC, DYNAMIC = "static", "dynamic"
Triple = tuple[int, int, int]
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
"""Input name -> (min, opt, max) shapes: one TensorRT optimisation profile."""
Profiles = tuple[tuple[str, Profile], ...]


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
    """Strongly typed on TensorRT >= 10.12 (each layer in its ONNX precision); before that fp16 ONNX needs
    BuilderFlag.FP16 and fp32 ONNX builds plain fp32."""
    if parse_version(trt_version)[:2] >= STRONGLY_TYPED_SINCE:
        return BuildMode(strongly_typed=True, fp16_flag=False)
    return BuildMode(strongly_typed=False, fp16_flag=onnx_precision == "fp16")


@dataclass(frozen=True)
class EngineSizes:
    """The sizes engines are tuned for: working height and width in pixels, images per call (None: defaults;
    AUTO_BATCH: what the GPU's memory allows)."""

    height: int | None = None
    width: int | None = None
    batch: int | str | None = None

    def to_json(self) -> dict[str, int | None]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EngineSizes:
        data = data or {}
        height, width = (int(data[k]) if data.get(k) else None for k in ("height", "width"))
        batch = data.get("batch")
        return cls(height, width, batch if batch == AUTO_BATCH else int(batch) if batch else None)

    @property
    def fixed_batch(self) -> int | None:
        """The batch asked for as a number (None for the default and for AUTO_BATCH)."""
        return None if self.batch == AUTO_BATCH else self.batch  # type: ignore[return-value]


def fitted_sides(native: int, multiple: int, *, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """(shortest, longest) side of every working size `fit_size` gives a photo of aspect 1..max_aspect."""
    from icdcli.io.images import fit_size

    base = 1000
    sizes = [
        fit_size(base + step, base, native_size=native, multiple=multiple)
        for step in range(int(base * (max_aspect - 1)) + 1)
    ]
    return min(h for _, h in sizes), max(w for w, _ in sizes)


def spatial_boxes(
    native: int, multiple: int, *, height: int | None = None, width: int | None = None, max_aspect: float = MAX_ASPECT
) -> dict[str, tuple[Triple, Triple]]:
    """(height, width) ranges in pixels of the native, landscape and portrait profiles.

    Landscape holds every fitted size with width >= height (height short..native, width native..long), portrait
    the transpose; a requested size outside them widens the one it belongs to and is its opt shape.
    """
    from icdcli.io.images import fit_size

    short, long = fitted_sides(native, multiple, max_aspect=max_aspect)
    work_h, work_w = height or native, width or native
    wide_w, wide_h = fit_size(
        3 * native, 2 * native, native_size=native, multiple=multiple
    )  # a 3:2 photo: opt of the dynamic profiles
    land_h, land_w = (min(short, work_h), wide_h, max(native, work_h)), (min(native, work_w), wide_w, max(long, work_w))
    if work_w >= work_h and (height or width):
        land_h, land_w = (land_h[0], work_h, land_h[2]), (land_w[0], work_w, land_w[2])
    port_h, port_w = (min(native, work_h), wide_w, max(long, work_h)), (min(short, work_w), wide_h, max(native, work_w))
    if work_h > work_w:
        port_h, port_w = (port_h[0], work_h, port_h[2]), (port_w[0], work_w, port_w[2])
    return {
        NATIVE: ((work_h,) * 3, (work_w,) * 3),
        LANDSCAPE: (land_h, land_w),
        PORTRAIT: (port_h, port_w),
    }


def axis_ranges(h: Triple, w: Triple, batch: Triple, *, vae_scale_factor: int) -> dict[str, Triple]:
    """Ranges of every named axis of the exported graphs, for one profile."""

    def latent(pixels: Triple) -> Triple:
        return (pixels[0] // vae_scale_factor, pixels[1] // vae_scale_factor, pixels[2] // vae_scale_factor)

    return {"batch": batch, "height": h, "width": w, "latent_height": latent(h), "latent_width": latent(w)}


def profile_shapes(spec: GraphSpec, ranges: dict[str, Triple]) -> Profile:
    """The optimisation profile of a graph: each symbolic dim replaced by its axis range."""
    profile: Profile = {}
    for tensor in spec.inputs:
        triple = [[dim] * 3 if isinstance(dim, int) else list(ranges[dim]) for dim in tensor.shape]
        profile[tensor.name] = tuple(tuple(column[i] for column in triple) for i in range(3))  # type: ignore[assignment]
    return profile


def is_static(profile: Profile) -> bool:
    return all(low == high for low, _, high in profile.values())


@dataclass(frozen=True)
class EngineRequest:
    """One engine to build: a graph and its optimisation profiles, in profile-index order."""

    graph: str
    profiles: Profiles

    @property
    def kind(self) -> str:
        return STATIC if all(is_static(p) for _, p in self.profiles) else DYNAMIC

    @property
    def profile(self) -> Profile:
        """The last (widest) profile: the only one for graphs of one shape."""
        return self.profiles[-1][1]

    def labelled(self, label: str) -> Profile:
        return dict(self.profiles)[label]


def graph_profiles(
    spec: GraphSpec, boxes: dict[str, tuple[Triple, Triple]], images: dict[str, int], *, p2p_axes: dict[str, Triple],
    vae_scale_factor: int,
) -> Profiles:  # fmt: skip
    """The distinct profiles of one graph: static native and batched native ones for UNets, then landscape and
    portrait. `images[label]` is how many images one call of that profile holds (see `profile_images`);
    `p2p_axes` the ranges of the P2P graph's rows and pairs."""
    rows = rows_per_image(spec)
    opt_rows = rows if spec.name in UNET_GRAPHS else 1  # one image (a text encoder: one prompt)
    labels = [NATIVE, BATCHED, LANDSCAPE, PORTRAIT] if spec.name in UNET_GRAPHS else [LANDSCAPE, PORTRAIT]
    found: list[tuple[str, Profile]] = []
    for label in labels:
        most = images[label] * rows
        if label == BATCHED and images[label] < 2:
            continue
        h, w = boxes[NATIVE if label == BATCHED else label]
        batch = {NATIVE: (1, 1, 1), BATCHED: (1, most, most)}.get(label, (1, opt_rows, most))
        ranges = axis_ranges(h, w, batch, vae_scale_factor=vae_scale_factor)
        ranges |= p2p_axes
        profile = profile_shapes(spec, ranges)
        if all(profile != seen for _, seen in found):
            found.append((label, profile))
    return tuple(found) if len(found) > 1 else ((ONLY, found[0][1]),)


def native_profiles(
    spec: GraphSpec, boxes: dict[str, tuple[Triple, Triple]], images: int, *, p2p_axes: dict[str, Triple],
    vae_scale_factor: int,
) -> Profiles:  # fmt: skip
    """The one profile of a native-first build: the working size (`boxes[NATIVE]`), 1..`images` images of
    `rows_per_image` rows each, opt one image. Static (the full plan's `native` profile) for one row."""
    rows = rows_per_image(spec)
    opt_rows = rows if spec.name in UNET_GRAPHS else 1
    most = images * rows
    h, w = boxes[NATIVE]
    ranges = axis_ranges(h, w, (1, min(opt_rows, most), most), vae_scale_factor=vae_scale_factor) | p2p_axes
    return ((NATIVE, profile_shapes(spec, ranges)),)


def rows_per_image(spec: GraphSpec) -> int:
    """Batch rows one image takes in a call of this graph: 2 for real CFG's [negative, prompt] pair on a guided
    UNet, 2 for the source and target prompt on a text encoder, else 1."""
    if spec.name in UNET_GRAPHS:
        return 2 if spec.guidance == GUIDANCE_CFG and spec.name != FORWARD else 1
    return 2 if spec.name.startswith("text_encoder") else 1


def power_of_two_floor(value: int) -> int:
    return 1 << (max(1, value).bit_length() - 1)


@dataclass(frozen=True)
class MemoryBudget:
    """What the largest batch an engine profile may hold is derived from (all in bytes).

    `device_bytes` is the GPU's total memory (not its free memory: the profiles, and so the engines' cache keys,
    must not change with what else runs at the moment); `weight_bytes` the weights of every engine resident at
    once; `bytes_per_position` the activation memory one image needs per latent position.
    """

    device_bytes: int
    weight_bytes: int
    bytes_per_position: int
    headroom: float = MEMORY_HEADROOM

    def largest_batch(self, positions: int) -> int:
        """Images per call whose activations at `positions` latent positions each fit beside the weights: a power
        of two (few distinct profiles), at least 1, at most MAX_BATCH."""
        spare = self.device_bytes * self.headroom - self.weight_bytes
        fits = int(spare // (self.bytes_per_position * max(1, positions))) if spare > 0 else 1
        return power_of_two_floor(min(max(fits, 1), MAX_BATCH))


def profile_images(
    boxes: dict[str, tuple[Triple, Triple]], vae_scale_factor: int, *, max_batch: int | None,
    budget: MemoryBudget | None,
) -> dict[str, int]:  # fmt: skip
    """Images per call of each profile label: `max_batch` when given, else what `budget` allows at the profile's
    largest latent size, else DEFAULT_BATCH. The native profile is always one image (static)."""
    images = {NATIVE: 1}
    for label in (BATCHED, LANDSCAPE, PORTRAIT):
        h, w = boxes[NATIVE if label == BATCHED else label]
        positions = (h[2] // vae_scale_factor) * (w[2] // vae_scale_factor)
        images[label] = max_batch or (budget.largest_batch(positions) if budget else DEFAULT_BATCH)
    return images


def plan_engines(
    manifest: Manifest, *, height: int | None = None, width: int | None = None, max_batch: int | None = None,
    graphs: Iterable[str] | None = None, budget: MemoryBudget | None = None, native_only: bool = False,
) -> list[EngineRequest]:  # fmt: skip
    """One engine per graph (those named in `graphs`, default all) with the profiles it needs.

    Args:
        max_batch: images per network call the dynamic profiles hold (a guided CFG UNet runs two rows per image);
            None: what `budget` allows for each profile's size, else DEFAULT_BATCH.
        budget: the device's memory, for a batch derived from it (`device_budget`).
        native_only: the first engines of a native-first build: graphs of several profiles get only
            `native_profiles`, for `max_batch` images per call (one when None); graphs of one profile keep it.
    """
    info = manifest.info
    native, multiple = int(info["native_size"]), int(info["size_multiple"])
    cfg = any(spec.guidance == GUIDANCE_CFG for spec in manifest.graphs.values())
    boxes = spatial_boxes(native, multiple, height=height, width=width)
    images = profile_images(boxes, manifest.vae_scale_factor, max_batch=max_batch, budget=budget)
    pairs = max_batch or (images[BATCHED] if budget else 1)  # P2P: one source/target pair unless a batch is asked
    rows = 4 if cfg else 2  # source + target rows (and real CFG's unconditional ones)
    p2p_axes = {P2P_BATCH: (2, rows, rows * pairs), P2P_PAIRS: (1, 1, pairs)}
    wanted = set(manifest.graphs if graphs is None else graphs)
    factor = manifest.vae_scale_factor
    requests = []
    for name, spec in manifest.graphs.items():
        if name not in wanted:
            continue
        profiles = graph_profiles(spec, boxes, images, p2p_axes=p2p_axes, vae_scale_factor=factor)
        if native_only and len(profiles) > 1:
            profiles = native_profiles(spec, boxes, max_batch or 1, p2p_axes=p2p_axes, vae_scale_factor=factor)
        requests.append(EngineRequest(name, profiles))
    return requests


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine is specific to besides TensorRT: the GPU's name and compute capability."""

    name: str
    capability: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-").lower()[:40] or "gpu"


def engine_cache_key(
    onnx_sha256: str, profiles: Profiles, *, mode: BuildMode, trt_version: str, device: DeviceFacts
) -> str:
    """sha256 of everything an engine depends on: change any of them and the engine is rebuilt."""
    payload = {
        "onnx": onnx_sha256,
        "profiles": [
            [label, {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())}]
            for label, profile in profiles
        ],
        "mode": asdict(mode),
        "tensorrt": trt_version,
        "device": device.name,
        "compute_capability": device.capability,
        "build_format": BUILD_FORMAT,
    }
    return json_sha256(payload)


def timing_cache_file(root: Path, trt_version: str, device: DeviceFacts) -> Path:
    """The tactic timing cache shared by every build for one TensorRT, GPU and build format."""
    capability = device.capability.replace(".", "")
    return root / f"timing-trt{trt_version}-{device.slug}-sm{capability}-f{BUILD_FORMAT}.cache"


def engine_file(folder: Path, request: EngineRequest, key: str) -> Path:
    return folder / f"{request.graph}-{key[:16]}.plan"


def stale_reason(meta: dict[str, Any] | None, key: str) -> str | None:
    """Why a cached engine cannot be loaded (None: it can). The key covers TensorRT, GPU, ONNX and profiles."""
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


def covers(profile: Profile, shapes: dict[str, Shape]) -> bool:
    """Whether every input shape lies within the profile's [min, max]."""
    for name, shape in shapes.items():
        low, _, high = profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            return False
    return True


def choose_profile(profiles: Profiles, shapes: dict[str, Shape]) -> int | None:
    """Index of the profile to run these shapes: a static one that matches exactly, else the first covering one."""
    order = sorted(range(len(profiles)), key=lambda i: not is_static(profiles[i][1]))
    return next((i for i in order if covers(profiles[i][1], shapes)), None)


def outside_message(graph: str, profiles: Profiles, shapes: dict[str, Shape]) -> str:
    ranges = "; ".join(
        f"{label}: {name} {low}..{high}" for label, p in profiles for name, (low, _, high) in p.items() if len(low) > 2
    )
    sample = next(iter(shapes.items()))
    return f"TensorRT engine {graph}: input {sample[0]} of shape {sample[1]} lies outside its profiles ({ranges})"


def previous_build_seconds(folder: Path, graph: str) -> float | None:
    """How long the last recorded build of this graph took here (any key), for the estimate before a build."""
    seconds = [meta.get("build_seconds") for meta in map(read_json, folder.glob(f"{graph}-*.json"))]
    known = [s for s in seconds if isinstance(s, int | float)]
    return max(known) if known else None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- TensorRT: the library, the logger, polygraphy --------------------------------------------------------


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise ICDError("TensorRT is not installed: pip install 'icd[tensorrt]' (needs an NVIDIA GPU)") from error
    return tensorrt


def _polygraphy() -> Any | None:
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
        poly = _polygraphy()
        if poly is not None:
            from icdcli.export.onnx import route_polygraphy_logs

            route_polygraphy_logs()  # TensorRT's messages through polygraphy's logger stay off stdout
            _LOGGER = poly.get_trt_logger()
        else:
            _LOGGER = _trt().Logger(_trt().Logger.WARNING)
    return _LOGGER


def device_facts(device: torch.device) -> DeviceFacts:
    major, minor = torch.cuda.get_device_capability(device)
    return DeviceFacts(torch.cuda.get_device_name(device), f"{major}.{minor}")


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    trt = _trt()
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


def make_progress_monitor(say: Callable[[str], None]) -> Any | None:
    """An IProgressMonitor that reports top-level build phases, or None on TensorRT without the interface."""
    trt = _trt()
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


# --- build ------------------------------------------------------------------------------------------------


def build_with_polygraphy(
    poly: Any, onnx_path: Path, profiles: Profiles, *, mode: BuildMode, timing_cache: Path | None, monitor: Any,
    workspace_bytes: int | None,
) -> bytes:  # fmt: skip
    """Serialized engine bytes through polygraphy: network from the ONNX path, config with profiles, timing cache."""
    trt = _trt()
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
    trt = _trt()
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
    from icdcli.io.atomic import atomic_path

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
    poly = _polygraphy()
    options: dict[str, Any] = {"mode": mode, "timing_cache": timing_cache, "monitor": monitor,
                               "workspace_bytes": workspace_bytes}  # fmt: skip
    serialized: bytes | None
    try:
        if poly is not None:
            from icdcli.export.onnx import polygraphy_quiet

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
    key = engine_cache_key(onnx_sha256, request.profiles, mode=mode, trt_version=_trt().__version__, device=device)
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
    trt = _trt()
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


# --- run --------------------------------------------------------------------------------------------------


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
        trt = _trt()
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
        trt = _trt()
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


def engines_root() -> Path:
    from icdcli.models.runtime import cache_root

    return cache_root() / "engines"


def resolve_sizes(folder: Path, *, height: int | None, width: int | None, max_batch: int | str | None) -> EngineSizes:
    """The sizes to build for: those given, else those the export was built for (`icd export --height ...`).
    A batch of AUTO_BATCH leaves it to the device's memory (`device_budget`)."""
    from icdcli.export.manifest import read_engine_sizes

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
    _trt()
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
    trt = _trt()
    mode = build_mode(trt.__version__, manifest.precision)
    cache = engines_root() / manifest.model_key
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
