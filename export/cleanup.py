"""Clean-up and saving of traced ONNX graphs: onnxruntime's offline optimisation, the constant folding TensorRT
builds want (polygraphy's, or onnx-graphsurgeon's where polygraphy is missing), weights over 2 GB in one external
file written without loading them, shape inference and the checker; and polygraphy's output kept off stdout.

onnx, onnxruntime and polygraphy are imported where used: nothing here needs torch.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def route_polygraphy_logs() -> None:
    """polygraphy prints its messages (and TensorRT's, through its logger) to stdout, where icd writes results:
    send them to Python logging instead ("Polygraphy": warnings reach stderr), without its colour-module probe."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return
    G_LOGGER.colors = False
    if hasattr(type(G_LOGGER), "use_python_logging_system"):  # polygraphy >= 0.50
        G_LOGGER.use_python_logging_system = True


@contextlib.contextmanager
def polygraphy_quiet() -> Iterator[None]:
    """While polygraphy runs: its logs routed (see `route_polygraphy_logs`), anything else it prints to stderr."""
    route_polygraphy_logs()
    with contextlib.redirect_stdout(sys.stderr):
        yield


def fold_constants(proto: Any, large: bool) -> tuple[Any, str | None]:
    """The graph with constants folded for TensorRT: polygraphy's folding, else onnx-graphsurgeon's, else as it is.

    Returns the graph and the tool that folded it (None: neither is installed)."""
    try:
        from polygraphy.backend.onnx import fold_constants as polygraphy_fold
    except ImportError:
        polygraphy_fold = None
    if polygraphy_fold is not None:
        # shape inference on an in-memory graph over 2 GB fails (protobuf's limit): fold without it then
        with polygraphy_quiet():
            return polygraphy_fold(proto, do_shape_inference=not large, error_ok=True), "polygraphy"
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        return proto, None
    graph = gs.import_onnx(proto)
    graph.fold_constants(error_ok=True).cleanup()
    return gs.export_onnx(graph), "onnx-graphsurgeon"


def ort_optimize(source: Path, target: Path, *, large: bool) -> None:
    """onnxruntime's offline basic-level optimisation (constant folding, redundant nodes): portable to any EP."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if large:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def external_files(proto: Any) -> set[str]:
    """Names of the external data files a graph's tensors point into (read from the graph, not from the data)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return {
        entry.value
        for tensor in _get_all_tensors(proto)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }


EXTERNAL_ALIGNMENT = 4096
"""Each external tensor starts at a multiple of this (a page): ONNX Runtime can then map weights rather than copy."""


def _external_entries(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def move_graph(source: Path, target: Path, *, chunk: int = 64 << 20) -> str | None:
    """Write the graph `source` as `target` with every external weight in one file `<target>.data`, without ever
    holding the weights in memory: only the small graph proto is read; the weights are copied file to file, a chunk
    at a time (or the one file moved, when onnxruntime's optimiser already wrote them so). Returns the external
    data file name; None, writing nothing, when the graph keeps its weights inline."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(source), load_external_data=False)
    tensors = [tensor for tensor in _get_all_tensors(proto) if uses_external_data(tensor)]
    if not tensors:  # weights inline (under 2 GB, so loading them is harmless): nothing to move
        return None
    external = target.name + ".data"
    files = {_external_entries(tensor)["location"] for tensor in tensors}

    def span(entries: dict[str, str]) -> tuple[int, int]:
        offset = int(entries.get("offset", 0))
        if "length" in entries:
            return offset, int(entries["length"])
        return offset, (source.parent / entries["location"]).stat().st_size - offset  # the whole file is the tensor

    if len(files) == 1:
        for tensor in tensors:
            _set_external(tensor, external, *span(_external_entries(tensor)))
        shutil.move(str(source.parent / files.pop()), str(target.parent / external))
    else:  # the TorchScript exporter writes one file per weight: gather them into one
        with open(target.parent / external, "wb") as out:
            for tensor in tensors:
                entries = _external_entries(tensor)
                out.write(b"\0" * (-out.tell() % EXTERNAL_ALIGNMENT))
                start_in, length = span(entries)
                offset = out.tell()
                with open(source.parent / entries["location"], "rb") as handle:
                    handle.seek(start_in)
                    for start in range(0, length, chunk):
                        out.write(handle.read(min(chunk, length - start)))
                _set_external(tensor, external, offset, length)
    onnx.save_model(proto, str(target))
    return external


def save_graph(source: Path, target: Path, *, large: bool, sanitize: bool = False) -> str | None:
    """Write `source` (with any external data beside it) as `target`, weights in one external file if large,
    constants folded if `sanitize`, then run onnx shape inference and the checker on the file (on the path: a graph
    over 2 GB cannot be checked in memory). Returns the external data file name, if any.

    A large graph that needs no folding is written by `move_graph`, its weights never read into memory: at SD1.5
    size each copy would be 3.4 GB (SDXL's 10 GB) beside the model being exported.
    """
    import onnx

    external = move_graph(source, target) if large and not sanitize else None
    if external is None:
        proto = onnx.load(str(source), load_external_data=True)
        if sanitize:
            proto, _ = fold_constants(proto, large)
        external = target.name + ".data" if large else None
        onnx.save_model(
            proto, str(target), save_as_external_data=large, all_tensors_to_one_file=True, location=external,
            size_threshold=1024,
        )  # fmt: skip
        del proto
    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    onnx.checker.check_model(str(target))
    return external


def sanitizer_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("polygraphy", "onnx_graphsurgeon"))
