"""OpenVINO over exported ONNX graphs, on the CPU: opt-in (`--backend openvino`), never chosen by `auto` until an
SD1.5-size measurement decides (issue #30).

OpenVINO reads the ONNX export of `icdcli.export` as it is (the graphs and manifest ONNX Runtime runs) and compiles
each graph for the CPU. The precision is OpenVINO's CPU inference hint: fp32 unless bf16 is asked for, since on a CPU
with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise pick bf16 by itself. Tensors cross as numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from icdcli.core.dtypes import TORCH_DTYPES
from icdcli.core.errors import ICDError
from icdcli.engines.base import BackendParts, GraphDenoiser, assemble_parts
from icdcli.export.manifest import GraphSpec, Manifest

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
"""icd's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values."""


def is_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cpu_has_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (the CPU has AVX512-BF16 or AMX)."""
    if core is None:
        import openvino

        core = openvino.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str) -> dict[str, str]:
    """The CPU plugin's settings for graphs run at `precision` (fp32 or bf16), one edit at a time."""
    if precision not in PRECISION_HINTS:
        raise ICDError(f"--backend openvino runs fp32 or bf16, not {precision}")
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}


def check_precision(core: Any, precision: str) -> None:
    """bf16 needs a CPU with bf16 instructions: say so in one line rather than run it emulated."""
    if precision == "bf16" and not cpu_has_bf16(core):
        raise ICDError(
            "this CPU lacks bf16 (AVX512-BF16 or AMX), so OpenVINO cannot run bf16 here: use --precision fp32"
        )


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ICDError(f"--backend openvino runs on the CPU only, not {device}: use --device cpu or another backend")


class OpenVinoGraph:
    """One graph compiled by OpenVINO behind the runner interface: named torch tensors in and out.

    Compiled on first use, as ONNX Runtime opens its CPU sessions: an edit needs the reverse graph or its P2P twin,
    never both; `release` frees the compiled graph until its next call."""

    def __init__(self, path: Path, spec: GraphSpec, *, core: Any, config: dict[str, str]):
        self.path, self.spec, self.core, self.config = path, spec, core, config
        self._compiled: Any = None
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
            try:
                self._compiled = self.core.compile_model(str(self.path), "CPU", self.config)
            except Exception as error:  # OpenVINO raises RuntimeError (and its own types) for unreadable graphs
                raise self._damaged(error) from error
        return self._compiled

    def release(self) -> None:
        """Drop the compiled graph, freeing its weights; the next call compiles it again."""
        self._compiled = None

    def _arrays(self, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        cpu = torch.device("cpu")
        return {s.name: feeds[s.name].to(cpu, TORCH_DTYPES[s.dtype]).contiguous().numpy() for s in self.spec.inputs}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(iter(feeds.values())).device
        compiled = self.compiled
        results = compiled(self._arrays(feeds), share_outputs=False)
        return {
            spec.name: torch.from_numpy(results[compiled.output(spec.name)]).to(device) for spec in self.spec.outputs
        }


class OpenVinoDenoiser(GraphDenoiser):
    """An exported UNet on OpenVINO, behind the exact denoiser interface (see `GraphDenoiser`)."""

    backend = "openvino"


def load_parts(
    folder: Path, manifest: Manifest, *, device: torch.device, precision: str = "fp32", fallbacks: dict[str, Any]
) -> BackendParts:
    """OpenVINO graphs for every graph of an export folder, run on the CPU at `precision` (fp32 or bf16)."""
    import openvino

    check_device(device)
    core = openvino.Core()
    check_precision(core, precision)
    config = compile_config(precision)

    def make_runner(spec: GraphSpec) -> OpenVinoGraph:
        return OpenVinoGraph(folder / spec.file, spec, core=core, config=config)

    return assemble_parts("openvino", manifest, make_runner, denoiser_class=OpenVinoDenoiser, fallbacks=fallbacks)
