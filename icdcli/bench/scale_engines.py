"""The engines behind `icd bench scale`'s rows: a loaded model on a backend at the row's precision, and ONNX
Runtime's int8 graphs.

OpenVINO rows run the fp32 export at the row's precision (fp32, bf16, or int8: NNCF's int8 weight compression of the
UNets, `icdcli.engines.openvino`). ONNX Runtime's int8 row runs `onnxruntime.quantization.quantize_dynamic` (int8
weights, activations quantized per call) of the fp32 export's UNet graphs, written once into a sibling folder of the
export (`<export>-int8`, a whole export: its text encoder and VAE graphs copied) and reused while the export's graphs
are the ones it was made from. The export itself is never written to, nor linked to: onnx refuses to read external
data that has a second hard link or is a symbolic link.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError
from icdcli.export.manifest import REVERSE_P2P, UNET_GRAPHS, GraphSpec, Manifest, read_manifest, write_manifest

INT8_SUFFIX = "-int8"
QUANTIZED_GRAPHS = (*UNET_GRAPHS, REVERSE_P2P)
INT8_SOURCE = "int8_source"
"""Key of the int8 folder's manifest `info`: the sha256 of each export graph it was quantized from."""


def accelerate_row(model: Any, backend: str, precision: str, progress: Callable[[str], None] | None = None) -> Any:
    """`model` on `backend` at the row's `precision` (the model itself for torch)."""
    from icdcli.backends.accelerated import accelerate

    if backend == "openvino":
        return _on_openvino(model, precision, progress)
    if backend == "onnxruntime" and precision == "int8":
        return _on_onnxruntime_int8(model, progress)
    return accelerate(model, backend, progress=progress)


def _on_openvino(model: Any, precision: str, progress: Callable[[str], None] | None) -> Any:
    from icdcli.backends.accelerated import AcceleratedModel, ensure_exported, torch_fallbacks
    from icdcli.engines import openvino as ov_engine

    ov_engine.check_device(model.device)
    folder, manifest = ensure_exported(model, precision="fp32", progress=progress)
    parts = ov_engine.load_parts(
        folder, manifest, device=model.device, precision=precision, fallbacks=torch_fallbacks(model)
    )
    return AcceleratedModel(model, parts)


def _on_onnxruntime_int8(model: Any, progress: Callable[[str], None] | None) -> Any:
    from icdcli.backends.accelerated import AcceleratedModel, ensure_exported, torch_fallbacks
    from icdcli.engines import onnxruntime as ort_engine

    folder, _ = ensure_exported(model, precision="fp32", progress=progress)
    quantized = quantized_export(folder, progress)
    manifest = _manifest(quantized)
    parts = ort_engine.load_parts(quantized, manifest, device=model.device, fallbacks=torch_fallbacks(model))
    return AcceleratedModel(model, parts)


# --- ONNX Runtime int8 --------------------------------------------------------------------------------------


def int8_folder(export: Path) -> Path:
    """Where the int8 graphs of the export folder `export` go: a sibling folder."""
    return export.with_name(export.name + INT8_SUFFIX)


def _manifest(folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    if manifest is None:
        raise ICDError(f"{folder} holds no readable manifest.json: delete it and run again to export anew")
    return manifest


def _sources(manifest: Manifest) -> dict[str, str]:
    return {name: spec.sha256 for name, spec in manifest.graphs.items() if name in QUANTIZED_GRAPHS}


def is_current(target: Path, export: Manifest) -> bool:
    """Whether `target` holds the int8 graphs of this very export (made from the same graph bytes, all present)."""
    manifest = read_manifest(target)
    if manifest is None or manifest.fingerprint != export.fingerprint:
        return False
    if manifest.info.get(INT8_SOURCE) != _sources(export) or manifest.graphs.keys() != export.graphs.keys():
        return False
    return all(path.is_file() for spec in manifest.graphs.values() for path in spec.files(target))


def _copy(export: Path, folder: Path, spec: GraphSpec) -> None:
    for path in spec.files(export):
        shutil.copyfile(path, folder / path.name)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic warns through the root logger that the graph was not pre-processed: not the user's business."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(export: Path, work: Path, spec: GraphSpec) -> GraphSpec:
    """One UNet graph of `export` quantized into `work` (int8 weights of its MatMuls and Convs, QInt8). The source is
    copied into a scratch folder first, since quantize_dynamic writes a shape-inferred copy beside its input."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from icdcli.core.digests import files_sha256

    scratch = work / f".source-{spec.name}"
    scratch.mkdir()
    _copy(export, scratch, spec)
    large = spec.external_data is not None  # over 2 GB at fp32: the int8 graph keeps its weights beside it too
    try:
        with _quiet_root_logger():
            quantize_dynamic(scratch / spec.file, work / spec.file, weight_type=QuantType.QInt8,
                             use_external_data_format=large)  # fmt: skip
    except Exception as error:  # onnxruntime's quantizer raises many types for graphs it cannot handle
        raise ICDError(
            f"onnxruntime's dynamic quantization cannot handle {spec.name} ({str(error).splitlines()[0][:200]}): "
            "leave out onnxruntime:int8"
        ) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = f"{spec.file}.data" if (work / f"{spec.file}.data").is_file() else None
    quantized = replace(spec, external_data=data)
    return replace(quantized, sha256=files_sha256(quantized.files(work)))


def quantized_export(export: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The int8 sibling folder of the fp32 export `export`, made (or found current): its UNet graphs quantized, the
    other graphs copied. ICDError, in one line, where the quantizer cannot handle a graph."""
    manifest = _manifest(export)
    target = int8_folder(export)
    if is_current(target, manifest):
        return target
    partial = target.with_name(f".{target.name}.partial")  # hidden: `icd info` lists the cache's exports
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    graphs = {}
    try:
        for name, spec in manifest.graphs.items():
            if name in QUANTIZED_GRAPHS:
                if progress:
                    progress(f"quantizing {name} to int8 (onnxruntime dynamic quantization)")
                graphs[name] = quantize_graph(export, partial, spec)
            else:
                _copy(export, partial, spec)
                graphs[name] = spec
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    info = {**manifest.info, INT8_SOURCE: _sources(manifest)}
    write_manifest(partial, replace(manifest, precision="int8", graphs=graphs, info=info))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
