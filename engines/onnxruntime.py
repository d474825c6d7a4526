"""ONNX Runtime sessions over exported graphs: the CPU provider, or CUDA (with I/O binding) where present.

On CUDA the sessions read and write torch tensors in place through I/O binding, so no tensor leaves the GPU
between the sampler and the graph. Ordering with torch: before each run torch's current stream is synchronised
(torch's writes of the inputs are complete before ONNX Runtime's stream reads them: ONNX Runtime ignores a
`user_compute_stream` of 0, torch's default stream, and then runs on a stream of its own); ONNX Runtime's run
returns once its outputs are written.

On the CPU each graph's optimized form is kept in icd's cache (`onnxruntime/`, see `icdcli.engines.prepared`): ONNX
Runtime's full optimization (ORT_ENABLE_ALL: fusions, and the CPU's blocked layouts, so the settings digest holds the
CPU's instructions and ONNX Runtime's version) is made once and saved with `optimized_model_filepath`, and later
sessions open the saved graph with no optimization. An SD1.5 UNet's session then opens in 1.4 s instead of 6.7, with
the same run time (3.5-3.8 s an evaluation at 512 px) and peak memory (4.4 GB), and the same outputs; saving it the
first time takes about 12 s more and 3.4 GB of disk. `ICD_ORT_CACHE=0` turns it off.
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from icdcli.core.cpu import cpu_flags
from icdcli.core.digests import files_sha256, text_sha256
from icdcli.core.dtypes import TORCH_DTYPES
from icdcli.core.errors import ICDError
from icdcli.core.pages import trim_freed_heap
from icdcli.engines.base import BackendParts, GraphDenoiser, assemble_parts, axes_of, resolve_shape
from icdcli.engines.prepared import error_line, graph_bytes, no_room, prepared_folder
from icdcli.export.manifest import UNET_GRAPHS, GraphSpec, Manifest
from icdcli.io.claims import file_lock

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
CACHE_SETTING = "ICD_ORT_CACHE"
"""Environment variable: 0 (or off, no, false) keeps optimized graphs out of the cache."""
CACHE_KIND = "onnxruntime"
"""The cache's folder of optimized CPU graphs (an `icd cache` kind)."""
OPTIMIZED, OPTIMIZED_DATA, COMPLETE = "graph.onnx", "graph.onnx.data", "complete"
"""A prepared folder's files: the optimized graph, its weights, and the mark written once both are whole."""

logger = logging.getLogger("icd")


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def has_cuda_provider() -> bool:
    return is_importable() and CUDA_EP in available_providers()


def cuda_provider_options(index: int, stream: int) -> dict[str, str]:
    """CUDA provider options: the device, and torch's stream when it is a real one (0, the default, is dropped)."""
    options = {"device_id": str(index)}
    if stream:
        options |= {"has_user_compute_stream": "1", "user_compute_stream": str(stream)}
    return options


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def providers_for(device: torch.device) -> list[Any]:
    """CUDA (on torch's current stream where it is not the default one) then CPU for a CUDA device with
    onnxruntime-gpu; else CPU only."""
    if device.type != "cuda" or not has_cuda_provider():
        return [CPU_EP]
    index = device_index(device)
    return [(CUDA_EP, cuda_provider_options(index, torch.cuda.current_stream(index).cuda_stream)), CPU_EP]


HASHED_AT_LOAD = 256 << 20
"""Graphs up to this size (with their external data) are checked against their recorded sha256 at every load."""
ARENA_UNETS_BELOW = 500 << 20
"""UNet graphs smaller than this (with their external data: the embedded and test models) keep ONNX Runtime's CPU
memory arena, whose reuse of small buffers is worth 4% of the embedded model's batch-64 throughput; larger ones (SD
size) run without it, as the text encoder and VAE always do (`OrtGraph.keeps_arena`)."""


@functools.lru_cache(maxsize=1)
def optimization_settings() -> dict[str, str]:
    """What an optimized CPU graph depends on besides the graph: ONNX Runtime's version and the CPU's instructions."""
    import onnxruntime as ort

    flags = cpu_flags()
    cpu = text_sha256(" ".join(sorted(flags)))[:16] if flags is not None else platform.processor() or "unknown"
    return {"onnxruntime": ort.__version__, "level": "all", "machine": platform.machine(), "cpu": cpu}


def clear_folder(folder: Path) -> None:
    """Remove what a prepared folder holds, keeping the folder (and its lock file)."""
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name != ".lock":
            path.unlink(missing_ok=True)


class OrtGraph:
    """One onnxruntime session behind the runner interface: named torch tensors in and out. On the CPU the session
    opens the graph's optimized form from the cache, saving it there first (`optimized_session`)."""

    def __init__(
        self, path: Path, spec: GraphSpec, *, device: torch.device, vae_scale_factor: int, model_name: str | None = None
    ):
        import numpy as np

        self.path, self.spec, self.device, self.vae_scale_factor = path, spec, device, vae_scale_factor
        self.model_name = model_name
        self.keep_optimized = spec is not None
        self._session: Any = None
        if device.type == "cuda":
            self.binding = CUDA_EP in self.session.get_providers()
        else:  # opened on first use: a swap edit never opens the P2P twin of the reverse graph (3.4 GB each)
            self.binding = False
            self._check_file()
        self.index = device_index(device) if self.binding else 0
        self.numpy_dtypes = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
        self.output_names = [output.name for output in spec.outputs]

    def _damaged(self, error: Exception) -> ICDError:
        return ICDError(
            f"onnxruntime cannot load {self.path} ({str(error).splitlines()[0][:200]}): the file is damaged or not "
            f"an icd export; delete the folder {self.path.parent} and run again to export anew, or use --backend torch"
        )

    def _check_file(self) -> None:
        """Check the graph now, so a damaged file is reported at load rather than mid-edit: against the sha256 its
        export recorded where the files are small enough to hash at every load (any changed byte, weights too; and
        no `import onnx`, about 0.6 s of a per-file edit's 3 s), else by reading the graph without its weights."""
        spec = self.spec
        files = spec.files(self.path.parent) if spec is not None else [self.path]
        try:
            if spec is not None and spec.sha256 and sum(path.stat().st_size for path in files) <= HASHED_AT_LOAD:
                if files_sha256(files) != spec.sha256:
                    raise ValueError("its bytes are not the ones exported (sha256 differs from the manifest's)")
                return
            import onnx

            onnx.load(str(self.path), load_external_data=False)
        except Exception as error:  # the hash, a missing file, and protobuf and onnx's several types for a damaged file
            raise self._damaged(error) from error

    def keeps_arena(self) -> bool:
        """Whether this graph's CPU session keeps ONNX Runtime's memory arena: only a small UNet's. The arena keeps a
        session's largest activations after its runs (the text encoder and VAE about 1.6 GB after a 512 px SD1.5 edit)
        and rounds a UNet's up (0.93 GB of an SD1.5 P2P stage's 8.08 GB peak); without it an SD1.5 edit took 2% longer
        (docs/benchmarks.md, CPU engines)."""
        if self.spec is None or not self.spec.name.startswith(UNET_GRAPHS):  # the P2P twin by its prefix too
            return False
        files = self.spec.files(self.path.parent)
        return sum(path.stat().st_size for path in files if path.exists()) < ARENA_UNETS_BELOW

    def _options(self, providers: list[Any], *, optimize: bool = True) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        # errors reach icd as exceptions, said in one line; ONNX Runtime's own copy of them only with -v
        options.log_severity_level = 3 if logger.isEnabledFor(logging.DEBUG) else 4
        if providers == [CPU_EP]:
            # Each session has its own pool of CPU threads, which by default spin after a run. With one session
            # per graph, torch between the runs and the reader and writer threads, spinning pools take the
            # cores from the next run: on 2 cores, edits ran 2-5x slower than with blocking threads.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.enable_cpu_mem_arena = self.keeps_arena()
        return options

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            providers = providers_for(self.device)
            try:
                if providers == [CPU_EP] and self.keep_optimized:
                    self._session = self.optimized_session(providers)
                else:
                    self._session = ort.InferenceSession(str(self.path), self._options(providers), providers=providers)
            except Exception as error:  # onnxruntime raises its own exception types for bad or unsupported graphs
                raise self._damaged(error) from error
        return self._session

    @session.setter
    def session(self, value: Any) -> None:
        self._session = value

    def optimized_session(self, providers: list[Any]) -> Any:
        """A CPU session over the graph's optimized form in the cache: opened with no optimization where it is whole,
        else optimized from the export and saved there (one process at a time; the others wait, then open it). A saved
        graph that does not open is optimized again; where saving fails (a full disk) the session is opened as before,
        with a one-line note, and this graph is not saved again in this run."""
        import onnxruntime as ort

        def plain() -> Any:
            return ort.InferenceSession(str(self.path), self._options(providers), providers=providers)

        folder = prepared_folder(
            CACHE_KIND, self.path.parent, self.spec, optimization_settings(), setting=CACHE_SETTING,
            name=self.model_name,
        )  # fmt: skip
        if folder is None:
            return plain()
        with file_lock(folder / ".lock"):
            if (folder / COMPLETE).is_file():
                try:
                    options = self._options(providers, optimize=False)
                    return ort.InferenceSession(str(folder / OPTIMIZED), options, providers=providers)
                except Exception as error:  # a damaged or foreign file: made again below
                    logger.warning("onnxruntime: the optimized %s in the cache does not open (%s): optimizing it "
                                   "again", self.spec.name, error_line(error))  # fmt: skip
                    clear_folder(folder)
            return self._save_optimized(folder, providers, plain)

    def _save_optimized(self, folder: Path, providers: list[Any], plain: Callable[[], Any]) -> Any:
        import onnxruntime as ort

        clear_folder(folder)  # what an interrupted save left
        full = no_room(folder, graph_bytes(self.path.parent, self.spec))
        if full is not None:
            logger.warning("onnxruntime: %s runs without its optimized form in the cache (%s)", self.spec.name, full)
            self.keep_optimized = False
            return plain()
        options = self._options(providers)
        options.optimized_model_filepath = str(folder / OPTIMIZED)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(self.path), options, providers=providers)
            (folder / COMPLETE).touch()
            return session
        except Exception as error:  # saving failed, or the graph does not open at all (then `plain` raises too)
            clear_folder(folder)
            session = plain()
            logger.warning("onnxruntime: %s runs without its optimized form in the cache (%s)", self.spec.name,
                           error_line(error))  # fmt: skip
            self.keep_optimized = False
            return session

    def release(self) -> None:
        """Close the session, freeing its weights and arenas; the next call opens it again."""
        if self._session is not None:
            self._session = None
            trim_freed_heap()

    def _inputs(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = self.device if self.binding else torch.device("cpu")
        return {s.name: feeds[s.name].to(target, TORCH_DTYPES[s.dtype]).contiguous() for s in self.spec.inputs}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self._inputs(feeds)
        if self.binding:
            return self._run_bound(inputs)
        arrays = self.session.run(self.output_names, {name: tensor.numpy() for name, tensor in inputs.items()})
        pairs = zip(self.output_names, arrays, strict=True)
        return {name: torch.from_numpy(array).to(self.device) for name, array in pairs}

    def synchronize(self) -> None:
        """Wait for torch's work on the device (the inputs' writes) before ONNX Runtime reads the inputs."""
        torch.cuda.current_stream(self.device).synchronize()

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = self.index
        binding = self.session.io_binding()
        for spec in self.spec.inputs:
            tensor = inputs[spec.name]
            binding.bind_input(
                spec.name, "cuda", index, self.numpy_dtypes[spec.dtype], list(tensor.shape), tensor.data_ptr()
            )
        axes = axes_of(self.spec.inputs, inputs)
        outputs = {}
        for spec in self.spec.outputs:
            shape = resolve_shape(spec.shape, axes, self.vae_scale_factor)
            tensor = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            binding.bind_output(spec.name, "cuda", index, self.numpy_dtypes[spec.dtype], list(shape), tensor.data_ptr())
            outputs[spec.name] = tensor
        self.synchronize()
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


class OnnxRuntimeDenoiser(GraphDenoiser):
    """An exported UNet on onnxruntime, behind the exact denoiser interface (see `GraphDenoiser`)."""

    backend = "onnxruntime"


def check_runnable(manifest: Manifest, device: torch.device) -> None:
    """fp16 graphs need the CUDA provider: the CPU provider has no fp16 kernels for most of their ops."""
    if manifest.precision == "fp16" and not (device.type == "cuda" and has_cuda_provider()):
        raise ICDError(
            "this fp16 ONNX export needs onnxruntime's CUDA provider (pip install onnxruntime-gpu) on a CUDA "
            "device: on the CPU export in fp32 (icd export without --fp16)"
        )


def load_parts(folder: Path, manifest: Manifest, *, device: torch.device, fallbacks: dict[str, Any]) -> BackendParts:
    """onnxruntime sessions for every graph of an export folder."""
    check_runnable(manifest, device)

    name = str(manifest.info.get("name") or folder.name)

    def make_runner(spec: GraphSpec) -> OrtGraph:
        return OrtGraph(
            folder / spec.file, spec, device=device, vae_scale_factor=manifest.vae_scale_factor, model_name=name
        )

    return assemble_parts("onnxruntime", manifest, make_runner, denoiser_class=OnnxRuntimeDenoiser, fallbacks=fallbacks)
