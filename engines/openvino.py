"""OpenVINO over exported ONNX graphs, on the CPU: opt-in (`--backend openvino`), never chosen by `auto` until an
SD1.5-size measurement decides (issue #30).

OpenVINO reads the ONNX export of `icdcli.export` as it is (the graphs and manifest ONNX Runtime runs) and compiles
each graph for the CPU. The precision is OpenVINO's CPU inference hint: fp32 unless bf16 is asked for, since on a CPU
with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise pick bf16 by itself. Tensors cross as numpy arrays.

int8 (`load_parts(precision="int8")`, `icd bench scale --backends openvino:int8`): NNCF's int8 weight compression
(`nncf.compress_weights`, INT8_ASYM: per output channel, asymmetric) of each UNet graph as read, before it is compiled;
the text encoder and VAE stay as exported, and so do the UNets' 1x1 convolutions (SD1.5's attention projections and
channel shortcuts, 6% of its weights: OpenVINO's CPU plugin turns a compressed 1x1 convolution into a fully connected
layer and then failed to compile an SD1.5-architecture P2P graph (shrunk, at 64 px)). The weights are stored in int8 and
computed with at bf16 where the CPU has it, else fp32. nncf is optional: `pip install "icd[openvino-int8]"`.

Compiled graphs up to 512 MB (`CACHED_GRAPH_BYTES`: all of the embedded model's, the text encoder and VAE of SD1.5-size
models) are kept in icd's cache (`openvino/<export>/<graph>-<settings>-<digest>`, OpenVINO's `CACHE_DIR`), so a later
compile of the same graph imports it instead: on the embedded model a P2P edit's graphs compile in about 0.6 s instead
of 3 s. OpenVINO keys a cached graph by the model file's path and some of the settings only, so each graph and set of
settings has its own folder, named with a digest of the graph (its sha256, size and modification time): a graph
exported again at the same path compiles into a new folder, and the old one is removed. int8 graphs, compressed in
memory, are not kept. `ICD_OPENVINO_CACHE=0` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from icdcli.core.dtypes import TORCH_DTYPES
from icdcli.core.errors import ICDError
from icdcli.core.pages import pages_dropped
from icdcli.engines.base import BackendParts, GraphDenoiser, assemble_parts
from icdcli.engines.prepared import error_line, graph_bytes, no_room, prepared_folder
from icdcli.export.manifest import REVERSE_P2P, UNET_GRAPHS, GraphSpec, Manifest
from icdcli.io.claims import file_lock

PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
"""icd's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values (int8 weights compute at one of them)."""
INT8_INSTALL = 'pip install "icd[openvino-int8]"'
COMPRESSED_GRAPHS = frozenset({*UNET_GRAPHS, REVERSE_P2P})
"""The graphs int8 compresses: the UNets (most of the weights and nearly all the work); not the text encoder or VAE."""
KEEPS_BUFFERS = COMPRESSED_GRAPHS
"""Graphs whose intermediate buffers stay allocated between calls: the UNets, called 4 times a stage (and freed after
it in low memory). The text encoder and VAE give theirs back after each call (`release_memory`): an SD1.5 VAE decoder
at 512 px otherwise keeps 1.2 GB, and allocating it again cost no time (10.0 s a decode either way)."""
CACHE_SETTING = "ICD_OPENVINO_CACHE"
"""Environment variable: 0 (or off, no, false) keeps compiled graphs out of the cache."""
CACHE_KIND = "openvino"
"""The cache's folder of compiled graphs (an `icd cache` kind)."""
CACHED_GRAPH_BYTES = 512 * 2**20
"""Graphs whose files are larger are compiled anew each time. An SD1.5 UNet (3.4 GB) imported from the cache gained
nothing (a low-memory P2P edit at 512 px: 71.6 s against 69.7 s compiling) and held 3.4 GB more resident (peak 10.3
GB against 6.9), since the compiled graph's mapped pages count; the text encoders and VAEs are under it."""

logger = logging.getLogger("icd")


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cpu_has_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (the CPU has AVX512-BF16 or AMX)."""
    if core is None:
        import openvino

        core = openvino.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def precision_for(dtype: torch.dtype) -> str:
    """The precision OpenVINO runs a model loaded at `dtype` in: bf16 for a bfloat16 model, else fp32."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def compute_precision(precision: str, *, bf16: bool = False) -> str:
    """What graphs at `precision` compute in: int8 weights at bf16 where the CPU has it (`bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise ICDError(f"--backend openvino runs {', '.join(PRECISIONS)}, not {precision}")
    if precision == "int8":
        return "bf16" if bf16 else "fp32"
    return precision


def compile_config(precision: str, *, bf16: bool = False) -> dict[str, str]:
    """The CPU plugin's settings for graphs run at `precision` (fp32, bf16, or int8 weights computing at bf16 where
    `bf16` says the CPU has it, else fp32), one edit at a time."""
    hint = PRECISION_HINTS[compute_precision(precision, bf16=bf16)]
    return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}


def nncf_importable() -> bool:
    return importlib.util.find_spec("nncf") is not None


def check_precision(core: Any, precision: str) -> None:
    """bf16 needs a CPU with bf16 instructions (say so in one line rather than run it emulated); int8 needs nncf."""
    if precision == "bf16" and not cpu_has_bf16(core):
        raise ICDError(
            "this CPU lacks bf16 (AVX512-BF16 or AMX), so OpenVINO cannot run bf16 here: use --precision fp32"
        )
    if precision == "int8" and not nncf_importable():
        raise ICDError(f"OpenVINO int8 compresses weights with nncf, which is not installed: {INT8_INSTALL}")


def pointwise_convolutions(model: Any) -> list[str]:
    """Names of the 1x1 convolutions of an openvino.Model (weights of shape [out, in, 1, 1])."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() == "Convolution":
            shape = op.input(1).get_partial_shape()
            if shape.is_static and list(shape.to_shape())[2:] == [1, 1]:
                names.append(op.get_friendly_name())
    return names


def compress_weights(model: Any) -> Any:
    """`model` (an openvino.Model) with NNCF's int8 weight compression (INT8_ASYM) of all its weights but the 1x1
    convolutions', its log and progress bar (which NNCF writes to stdout, where `--json` lines go) kept quiet."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    ignored = nncf.IgnoredScope(names=pointwise_convolutions(model), validate=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.compress_weights(model, ignored_scope=ignored)


def compiled_cache(folder: Path, spec: GraphSpec, config: dict[str, str], name: str | None = None) -> Path | None:
    """The folder to give OpenVINO as `CACHE_DIR` for `spec`'s graph in the export `folder` compiled with `config`
    (`icdcli.engines.prepared.prepared_folder`: the precision hint, which OpenVINO's own key leaves out, is in the
    folder's name: a graph compiled at f32 was imported for a bf16 compile and computed garbage); None when caching is
    off (`ICD_OPENVINO_CACHE`) or the cache cannot be written."""
    return prepared_folder(CACHE_KIND, folder, spec, config, setting=CACHE_SETTING, name=name)


def kept_compiled(folder: Path, spec: GraphSpec, config: dict[str, str], name: str | None = None) -> Path | None:
    """`compiled_cache` for a graph up to `CACHED_GRAPH_BYTES`; None for a larger one."""
    if graph_bytes(folder, spec) > CACHED_GRAPH_BYTES:
        return None
    return compiled_cache(folder, spec, config, name)


def kept_blobs(folder: Path) -> bool:
    """Whether OpenVINO has kept a compiled graph in `folder` (its `.blob` files): importing it needs no space."""
    return any(folder.glob("*.blob"))


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ICDError(f"--backend openvino runs on the CPU only, not {device}: use --device cpu or another backend")


class OpenVinoGraph:
    """One graph compiled by OpenVINO behind the runner interface: named torch tensors in and out.

    Compiled on first use, as ONNX Runtime opens its CPU sessions: an edit needs the reverse graph or its P2P twin,
    never both; `release` frees the compiled graph until its next call. With `compress` (int8), the graph is read,
    compressed once and kept compressed (a quarter of its fp32 weights), so a call after `release` compiles again
    without compressing again. The compile and the first run, which read the mapped weight file, drop its pages as
    they go (`icdcli.core.pages`): an SD1.5 UNet then holds 4.0 GB resident instead of 7.5. With `cache` (a folder,
    see `compiled_cache`, or what finds it on the first compile) OpenVINO keeps the compiled graph there and imports
    it on later compiles; a compile that fails with the cache is tried once more without it."""

    def __init__(
        self, path: Path, spec: GraphSpec, *, core: Any, config: dict[str, str],
        compress: Callable[[Any], Any] | None = None, cache: Path | Callable[[], Path | None] | None = None,
    ):  # fmt: skip
        self.path, self.spec, self.core, self.config, self.compress = path, spec, core, config, compress
        self.cache = cache if compress is None else None  # a callable: the folder, found on the first compile
        self._compiled: Any = None
        self._compressed: Any = None
        self._ran = False
        self.weight_files = spec.files(path.parent)
        self.graph_bytes = graph_bytes(path.parent, spec)
        if not path.is_file():
            raise self._damaged(FileNotFoundError(f"{path.name} is missing"))

    def _damaged(self, error: Exception) -> ICDError:
        return ICDError(
            f"openvino cannot load {self.path} ({str(error).splitlines()[0][:200]}): the file is damaged or not an "
            f"icd export; delete the folder {self.path.parent} and run again to export anew, or use --backend torch"
        )

    @property
    def compiled(self) -> Any:
        if self._compiled is None:
            source = str(self.path) if self.compress is None else self._compressed_model()
            try:
                with pages_dropped(self.weight_files):
                    self._compiled = self._compile(source)
                self._ran = False
            except Exception as error:  # OpenVINO raises RuntimeError (and its own types) for unreadable graphs
                if self.compress is None:
                    raise self._damaged(error) from error
                raise self._not_int8(f"OpenVINO cannot compile the int8 {self.path.name}", error) from error
        return self._compiled

    def _compile(self, source: Any) -> Any:
        if callable(self.cache):
            self.cache = self.cache()
            full = None if self.cache is None or kept_blobs(self.cache) else no_room(self.cache, self.graph_bytes)
            if full is not None:
                logger.warning("openvino: %s compiled without its cache (%s)", self.spec.name, full)
                self.cache = None
        if self.cache is None:
            return self.core.compile_model(source, "CPU", self.config)
        try:
            with file_lock(self.cache / ".lock"):  # one process writes a compiled graph while others wait to import it
                return self.core.compile_model(source, "CPU", {**self.config, "CACHE_DIR": str(self.cache)})
        except Exception as error:  # a cache that cannot be written or read (a full disk, say): compile as before
            compiled = self.core.compile_model(source, "CPU", self.config)  # a damaged graph fails here too
            logger.warning("openvino: %s compiled without its cache (%s)", self.spec.name, error_line(error))
            self.cache = None
            return compiled

    def _not_int8(self, what: str, error: Exception) -> ICDError:
        lines = [line for line in str(error).splitlines() if line.strip()]
        return ICDError(f"{what} ({(lines[-1] if lines else '')[:200]}): use --precision fp32 or bf16")

    def _compressed_model(self) -> Any:
        if self._compressed is None:
            assert self.compress is not None
            try:
                read = self.core.read_model(str(self.path))
            except Exception as error:  # as for compile_model
                raise self._damaged(error) from error
            try:
                self._compressed = self.compress(read)
            except Exception as error:  # nncf raises its own types and RuntimeError
                raise self._not_int8(f"nncf cannot compress {self.path.name} to int8", error) from error
        return self._compressed

    def release(self) -> None:
        """Drop the compiled graph, freeing its weights; the next call compiles it again."""
        self._compiled = None

    def _arrays(self, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        cpu = torch.device("cpu")
        return {s.name: feeds[s.name].to(cpu, TORCH_DTYPES[s.dtype]).contiguous().numpy() for s in self.spec.inputs}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(iter(feeds.values())).device
        compiled = self.compiled
        arrays = self._arrays(feeds)
        if self._ran:
            results = compiled(arrays, share_outputs=False)
        else:  # the first run repacks the weights, reading the mapped file once more
            with pages_dropped(self.weight_files):
                results = compiled(arrays, share_outputs=False)
            self._ran = True
        outputs = {
            spec.name: torch.from_numpy(results[compiled.output(spec.name)]).to(device) for spec in self.spec.outputs
        }
        if self.spec.name not in KEEPS_BUFFERS:
            compiled.release_memory()
        return outputs


class OpenVinoDenoiser(GraphDenoiser):
    """An exported UNet on OpenVINO, behind the exact denoiser interface (see `GraphDenoiser`)."""

    backend = "openvino"


def load_parts(
    folder: Path, manifest: Manifest, *, device: torch.device, precision: str = "fp32", fallbacks: dict[str, Any]
) -> BackendParts:
    """OpenVINO graphs for every graph of an export folder, run on the CPU at `precision`: fp32, bf16, or int8 (the
    UNets' weights compressed by NNCF, computing at bf16 where the CPU has it, else fp32)."""
    import openvino

    check_device(device)
    compute_precision(precision)  # an unknown precision: one line, before OpenVINO starts
    core = openvino.Core()
    check_precision(core, precision)
    config = compile_config(precision, bf16=precision == "int8" and cpu_has_bf16(core))

    name = str(manifest.info.get("name") or folder.name)

    def make_runner(spec: GraphSpec) -> OpenVinoGraph:
        compress = compress_weights if precision == "int8" and spec.name in COMPRESSED_GRAPHS else None
        # found on the first compile, so graphs an edit never runs (the teacher's) leave no folder in the cache
        cache = None if compress else functools.partial(kept_compiled, folder, spec, config, name)
        return OpenVinoGraph(folder / spec.file, spec, core=core, config=config, compress=compress, cache=cache)

    return assemble_parts("openvino", manifest, make_runner, denoiser_class=OpenVinoDenoiser, fallbacks=fallbacks)
