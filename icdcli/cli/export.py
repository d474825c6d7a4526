"""`icd export`: ONNX export (and TensorRT engine builds) ahead of time; `describe_cache` for `icd info`.

Registered on the main group by `icdcli.cli.main` (`main.add_command(export)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import load_model, reports_errors
from icdcli.cli.console import console_options, say
from icdcli.cli.options import TextPath, model_options


class BatchType(click.ParamType):
    """`--batch`: a whole number of images per call (at least 1), or `auto`."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            number = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor auto", param, ctx)
        if number < 1:
            self.fail(f"{number} images per call: give at least 1, or auto", param, ctx)
        return number


@click.command("export")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="onnxruntime: write the ONNX graphs. tensorrt: also build TensorRT engines (needs a GPU and TensorRT).",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Export UNets and text encoders in fp16, for TensorRT / CUDA (an SD1.5-family VAE computes in fp16 behind "
    "float32 inputs and outputs; SDXL's VAE stays fp32).",
)
@click.option(
    "--height", type=click.IntRange(min=8), default=None, help="TensorRT: image height the engines are tuned for."
)
@click.option(
    "--width", type=click.IntRange(min=8), default=None, help="TensorRT: image width the engines are tuned for."
)
@click.option(
    "--batch",
    type=BatchType(),
    default=None,
    help="TensorRT: images per network call the engines hold (a CFG UNet runs two rows per image). Default: 1-2, "
    "plus a batched profile at the native size; `auto`: as many as the GPU's memory allows for each size.",
)
@click.option(
    "--out",
    type=TextPath(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the ONNX graphs. Default: the cache (icd info shows where), used by --backend on later runs.",
)
@click.option(
    "--p2p/--no-p2p",
    default=None,
    help="Include the reverse UNet with Prompt-to-Prompt control inside (another copy of its weights). "
    "Default: for SD1.5-family models, whose edits default to P2P.",
)
@click.option(
    "--fp32-norm/--no-fp32-norm",
    default=None,
    help="With --fp16: keep GroupNorm/LayerNorm and the P2P softmax in fp32 (the default of a new fp16 export: "
    "TensorRT >= 10.12 builds strongly typed and would run them in fp16). --no-fp32-norm exports them in fp16, for "
    "when a measurement shows fp16 safe. Not given: an existing export of either kind is kept.",
)
@click.option(
    "--native-only",
    is_flag=True,
    help="With --backend tensorrt: build each engine with one profile, at the working size (--height/--width, else "
    "the native size) and batch; engines for other sizes are built when an edit first needs them. Minutes instead "
    "of the build of every profile.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Compare every graph with PyTorch: on ONNX Runtime (fp16 graphs need onnxruntime-gpu on a CUDA device), "
    "with --backend tensorrt the engines.",
)
@click.option("--force", is_flag=True, help="Export again even when an up-to-date export exists.")
@model_options
@console_options
@reports_errors
def export(
    backend: str,
    fp16: bool,
    height: int | None,
    width: int | None,
    batch: int | None,
    out: Path | None,
    p2p: bool | None,
    fp32_norm: bool | None,
    native_only: bool,
    check: bool,
    force: bool,
    **model_opts: Any,
) -> None:
    """Export the model's UNets, VAE and text encoders to ONNX, and optionally build TensorRT engines.

    The forward UNet is exported with w = 1 folded in; a guidance-distilled reverse UNet takes the
    guidance embedding as `timestep_cond`. Graphs go to a temporary folder that is renamed when complete,
    with a manifest.json that records the model, precision, opset and versions. Later runs with
    --backend onnxruntime/tensorrt find the export in the cache; without it they export on first use.

    \b
    Examples:
      icd export                                   # the embedded model, fp32 ONNX in the cache
      icd export --model sd15 --backend tensorrt --fp16 --height 512 --width 512
      icd export --model ./my-model --out ./my-model-onnx
      icd export --model sd15 --backend tensorrt --native-only   # one profile per engine: a first edit in minutes
      icd export --model sd15 --fp16 --no-fp32-norm --check --backend tensorrt

    With --backend tensorrt the sizes given (--height/--width/--batch) are saved with the export, and later runs
    build and find engines for those same sizes.
    """
    from icdcli.backends.accelerated import ensure_exported, select_backend

    if backend == "tensorrt":
        if not fp16 and model_opts.get("precision") == "auto":
            fp16 = True
        select_backend("tensorrt", device=model_opts.get("device") if model_opts.get("device") != "auto" else "cuda")
    else:
        select_backend("onnxruntime")
    if fp32_norm is not None and not fp16:
        flag = "--fp32-norm" if fp32_norm else "--no-fp32-norm"
        raise click.UsageError(f"{flag} applies to fp16 exports: add --fp16 (or --backend tensorrt)")
    if native_only and backend != "tensorrt":
        raise click.UsageError("--native-only chooses which TensorRT engines to build: add --backend tensorrt")
    from icdcli.models.runtime import ICDModel

    loaded = load_model(model_opts, need_teacher=True)
    model, label = loaded.model, loaded.label
    assert isinstance(model, ICDModel), "export loads the PyTorch model (no backend)"
    size_problem = engine_size_problem(height, width, int(model.info.size_multiple))
    if size_problem:
        raise click.UsageError(size_problem)
    precision = "fp16" if fp16 else "fp32"
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        say(message)

    folder, manifest = ensure_exported(
        model, precision=precision, out_dir=out, force=force, progress=progress, p2p=p2p,
        fp32_norm=fp32_norm, for_tensorrt=backend == "tensorrt",
    )  # fmt: skip
    say(f"ONNX export: {folder}" if said else f"ONNX export of {label} ({precision}) is up to date: {folder}")
    if check and backend != "tensorrt":
        report_check(model, folder, manifest)
    if backend == "tensorrt":
        from icdcli.backends.accelerated import torch_fallbacks
        from icdcli.engines import tensorrt as trt_engine
        from icdcli.engines.tensorrt_plan import ALL_PROFILES, NATIVE_FIRST, EngineSizes
        from icdcli.export.manifest import write_engine_sizes

        sizes = EngineSizes(height, width, batch)
        write_engine_sizes(folder, sizes.to_json())  # later runs build and find these same engines
        parts = trt_engine.load_parts(
            folder, manifest, model, fallbacks=torch_fallbacks(model), progress=say, height=height, width=width,
            max_batch=batch, build_now=list(manifest.graphs),
            profiles=NATIVE_FIRST if native_only else ALL_PROFILES,
        )  # fmt: skip
        say(f"TensorRT engines: {trt_engine.engines_root() / manifest.model_key}")
        if check:
            report_check(model, folder, manifest, parts.runners, "TensorRT")


def engine_size_problem(height: int | None, width: int | None, multiple: int) -> str | None:
    """Why --height/--width cannot be engine sizes for this model (None: they can)."""
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and value % multiple:
            nearest = value // multiple * multiple or multiple
            return f"{name} {value} is not a multiple of {multiple}, the model's size step: use {nearest}"
    return None


def report_check(
    model: Any, folder: Path, manifest: Any, runners: dict[str, Any] | None = None, backend: str = "ONNX Runtime"
) -> None:
    """`--check`: each graph against PyTorch; a ClickException when any differs beyond its tolerance."""
    from icdcli.export.check import check_export

    say(f"checking every graph against PyTorch on {backend} ...")
    checks = check_export(model, folder, manifest, progress=say, runners=runners)
    for skipped in (c for c in checks if c.error is None):
        say(f"  {skipped.graph}: {skipped.note}")
    failed = [c.graph for c in checks if c.error is not None and not c.passed]
    if failed:
        raise click.ClickException(f"graphs differ from PyTorch beyond tolerance: {', '.join(failed)}; export again")


def _entries(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def describe_cache() -> dict[str, Any]:
    """ONNX exports and TensorRT engines in the cache, for `icd info`."""
    from icdcli.core.paths import cache_root
    from icdcli.export.files import folder_size
    from icdcli.export.manifest import export_root, read_manifest

    exports = []
    for folder in _entries(export_root(), "*"):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        manifest = read_manifest(folder)
        exports.append(
            {
                "path": str(folder),
                "model": manifest.info.get("name") if manifest else None,
                "precision": manifest.precision if manifest else None,
                "graphs": sorted(manifest.graphs) if manifest else [],
                "complete": manifest is not None,
                "bytes": folder_size(folder),
            }
        )
    engines = []
    for meta_path in _entries(cache_root() / "engines", "*/*.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        plan = meta_path.with_suffix(".plan")
        engines.append(
            {
                "path": str(plan),
                "graph": meta.get("graph"),
                "profiles": sorted(meta.get("profiles") or {}),
                "tensorrt": meta.get("tensorrt"),
                "device": meta.get("device"),
                "compute_capability": meta.get("compute_capability"),
                "bytes": plan.stat().st_size if plan.is_file() else 0,
            }
        )
    return {"onnx": exports, "engines": engines}
