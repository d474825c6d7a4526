"""TensorRT engine planning, without TensorRT: profiles, shapes, build mode, cache keys and staleness.

Plain functions over manifests, dicts and strings (tested without TensorRT or a GPU). One engine per graph, with one
optimisation profile per kind of shape it must run:
- UNets: `native` - batch 1 at the working size (min = opt = max: the fastest kernels, CUDA-graph replay at once) -
  `batched`, the working size at 1..N images, then `landscape` and `portrait`, which together hold every size
  `icdcli.io.images.fit_size` gives a photo of aspect up to `MAX_ASPECT`, at 1..N images (two rows each for real CFG);
- VAE: `landscape` and `portrait`; text encoders and the P2P graph: their one shape.
N is the batch asked for, else DEFAULT_BATCH, or with AUTO_BATCH what the GPU's memory allows (`MemoryBudget`).
Photos thinner than `MAX_ASPECT` (and any shape outside every profile) run on PyTorch with a note.

An engine's cache key is the sha256 of (ONNX hash, profiles, build mode, TensorRT version, GPU name and compute
capability, `BUILD_FORMAT`): a foreign or stale engine has another key and is never loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from icdcli.core.digests import json_sha256
from icdcli.export.manifest import FORWARD, GUIDANCE_CFG, P2P_BATCH, P2P_PAIRS, UNET_GRAPHS, GraphSpec, Manifest

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
