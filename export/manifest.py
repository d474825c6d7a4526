"""The export manifest: which graphs a folder holds, their inputs and outputs, and what they were made from.

`manifest.json` sits beside the `.onnx` files. A folder is reused only when its manifest names the same
source model (fingerprint), precision, opset and export format; anything else means export again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.models.identity import model_fingerprint

if TYPE_CHECKING:
    from icdcli.models.runtime import ICDModel

MANIFEST = "manifest.json"
TEACHER_MISSING = "the export has no teacher UNet"
ENGINE_SIZES = "engine_sizes.json"
"""Beside the manifest: the sizes `icd export --backend tensorrt --height/--width/--batch` built engines for."""
EXPORT_FORMAT = 5
"""Bump when graph signatures or what a graph computes change: every cached export then counts as stale (3: the P2P
graph's pair axis; 4: the P2P graph's attention reads its probabilities once,
`icdcli.diffusion.p2p.attention.controlled_attention`;
5: fp16 exports keep normalisation and the P2P softmax in fp32 by default, and run an SD1.5-family VAE in fp16
inside float32 inputs and outputs, `icdcli.core.dtypes.vae_precision`)."""
DEFAULT_FP32_NORM = True
"""Whether a new fp16 export keeps GroupNorm/LayerNorm and the P2P graph's softmax in fp32 (`--fp32-norm`, opt out
with `--no-fp32-norm`): strongly typed TensorRT runs them in the graph's precision, and until a measurement on a GPU
shows fp16 safe there, they stay fp32."""
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")

FORWARD, REVERSE, TEACHER = "forward_unet", "reverse_unet", "teacher_unet"
VAE_ENCODER, VAE_DECODER = "vae_encoder", "vae_decoder"
UNET_GRAPHS = (FORWARD, REVERSE, TEACHER)
REQUIRED_GRAPHS = (FORWARD, REVERSE, VAE_ENCODER, VAE_DECODER)
"""Graphs every usable export holds (and at least one text encoder): a folder without one of them, left by an export
that stopped or a tool that wrote a part, is exported again rather than failing at load."""
REVERSE_P2P = "reverse_unet_p2p"
"""The reverse UNet with Prompt-to-Prompt control as inputs and blend maps as an output (see export.signatures)."""
P2P_CONTROL_INPUTS = ("cross_alpha", "refine", "mapper", "reweight", "self_replace")
P2P_BATCH = "p2p_batch"
"""Rows of the P2P graph: 2 per (source, target) pair, 4 with real CFG's unconditional rows."""
P2P_PAIRS = "p2p_pairs"
"""Leading axis of the P2P graph's control inputs and blend maps: the (source, target) pairs of one call."""

# How a UNet graph takes guidance: a `timestep_cond` input, w = 1 folded into the graph, or real CFG by batch.
GUIDANCE_EMBEDDING, GUIDANCE_FOLDED, GUIDANCE_CFG = "embedding", "folded", "cfg"


@dataclass
class TensorSpec:
    """One graph input or output. Shape entries are ints (static) or axis names (dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    name: str
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    guidance: str | None = None
    sha256: str = ""
    external_data: str | None = None

    def files(self, folder: Path) -> list[Path]:
        """The graph's files in its export `folder`: the `.onnx` and, for a large graph, its external weights."""
        return [folder / self.file] + ([folder / self.external_data] if self.external_data else [])

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphSpec:
        specs = {key: [TensorSpec(**item) for item in data[key]] for key in ("inputs", "outputs")}
        return cls(**{**data, **specs})


@dataclass
class Manifest:
    model_key: str
    fingerprint: str
    precision: str
    opset: int
    info: dict[str, Any]
    vae_scale_factor: int
    latent_channels: int
    text_length: int
    graphs: dict[str, GraphSpec]
    versions: dict[str, str | None] = field(default_factory=dict)
    export_format: int = EXPORT_FORMAT
    sanitized: bool = False
    """Constants folded for TensorRT (polygraphy / onnx-graphsurgeon)."""
    fp32_norm: bool = False
    """GroupNorm/LayerNorm (and the P2P graph's softmax) of an fp16 export kept in fp32."""
    vae_precision: str = "float32"
    """The dtype the VAE graphs compute in (their inputs and outputs are float32 whatever it is)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        graphs = {name: GraphSpec.from_json(graph) for name, graph in data["graphs"].items()}
        return cls(**{**data, "graphs": graphs})


def write_manifest(folder: Path, manifest: Manifest, *, name: str = MANIFEST) -> Path:
    path = folder / name
    path.write_text(json.dumps(manifest.to_json(), indent=2))
    return path


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, or None when it is missing or unreadable (an interrupted or foreign folder)."""
    path = Path(folder) / MANIFEST
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_export_files(folder: Path) -> str | None:
    """Why the existing `folder` is not an ONNX export icd may replace (a `manifest.json` that is not icd's, files
    its manifest does not name), or None. Folders in icd's cache are icd's whatever they hold (an export an older
    icd wrote is replaced when it is stale)."""
    from icdcli.core.paths import cache_root

    if Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(cache_root())):
        return None
    manifest = read_manifest(folder)
    if manifest is None:
        return f"exists and is not an icd export (no icd {MANIFEST} in it); choose another path or empty it"
    known = {MANIFEST, ENGINE_SIZES} | {path.name for spec in manifest.graphs.values() for path in spec.files(folder)}
    others = sorted(entry.name for entry in folder.iterdir() if entry.name not in known and entry.name[0] != ".")
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return (
            f"is an icd export that also holds files icd did not write ({shown}); move them out or choose another path"
        )
    return None


def write_engine_sizes(folder: str | Path, sizes: dict[str, int | None]) -> Path:
    """Record the sizes engines were built for, so later runs build (and find in the cache) the same engines."""
    from icdcli.io.atomic import atomic_path

    path = Path(folder) / ENGINE_SIZES
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(sizes, indent=2))
    return path


def read_engine_sizes(folder: str | Path) -> dict[str, int | None] | None:
    """The sizes recorded by `write_engine_sizes`, or None when there are none (or they are unreadable)."""
    try:
        sizes = json.loads((Path(folder) / ENGINE_SIZES).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(sizes, dict):
        return None
    return {key: value for key, value in sizes.items() if isinstance(value, int) and value > 0}


def stale_reason(
    manifest: Manifest | None, fingerprint: str, precision: str, opset: int, *, need_teacher: bool = False,
    fp32_norm: bool | None = None, need_sanitized: bool = False,
) -> str | None:  # fmt: skip
    """Why an existing export cannot serve this model, or None when it can.

    Args:
        manifest: The export's manifest; None when there is no export.
        fingerprint: The model's `model_fingerprint`.
        precision: The precision wanted.
        opset: The opset wanted.
        need_teacher: The export must hold the teacher UNet.
        fp32_norm: Normalisation of fp16 graphs in fp32 wanted or not; None: either kind.
        need_sanitized: TensorRT wants graphs with constants folded.
    """
    if manifest is None:
        return "no export yet"
    missing = [name for name in REQUIRED_GRAPHS if name not in manifest.graphs]
    if not any(name.startswith("text_encoder") for name in manifest.graphs):
        missing.append("text_encoder")
    checks = (
        (bool(missing), f"the export lacks the {', '.join(missing)} graph{'s' if len(missing) > 1 else ''}"),
        (manifest.export_format != EXPORT_FORMAT, f"export format {manifest.export_format} != {EXPORT_FORMAT}"),
        (manifest.fingerprint != fingerprint, "the source model changed"),
        (manifest.precision != precision, f"precision {manifest.precision} != {precision}"),
        (manifest.opset != opset, f"opset {manifest.opset} != {opset}"),
        (need_teacher and TEACHER not in manifest.graphs, TEACHER_MISSING),
        (
            fp32_norm is not None and precision == "fp16" and manifest.fp32_norm != fp32_norm,
            f"normalisation in fp32: {manifest.fp32_norm} != {fp32_norm}",
        ),
        (need_sanitized and not manifest.sanitized, "its graphs are not constant-folded for TensorRT"),
    )
    return next((reason for failed, reason in checks if failed), None)


def model_key(name: str, fingerprint: str, precision: str) -> str:
    """Folder name of an export: readable model name, fingerprint prefix, precision."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "model"
    return f"{slug}-{fingerprint[:16]}-{precision}"


def export_root() -> Path:
    from icdcli.core.paths import cache_root

    return cache_root() / "onnx"


def export_dir(name: str, fingerprint: str, precision: str) -> Path:
    """The cache's export folder of a model named `name` with this fingerprint and precision."""
    return export_root() / model_key(name, fingerprint, precision)


def default_export_dir(model: ICDModel, precision: str) -> Path:
    return export_dir(model.info.name, model_fingerprint(model), precision)


def versions() -> dict[str, str | None]:
    import importlib.metadata

    from icdcli.core.version import __version__

    found: dict[str, str | None] = {"icd": __version__}
    for distribution in ("torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution] = None
    return found
