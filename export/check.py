"""`icd export --check`: each exported graph against the PyTorch module it was traced from, on ONNX Runtime (or,
given the runners of a backend, on that backend: `icd export --backend tensorrt --check` checks the engines).

Inputs are the exporter's own example tensors: batch 2 and 8x8 latents on ONNX Runtime; batch 1 at the native
size through a backend's runners (TensorRT profiles start at half the native side). The error is
max |graph - torch| relative to the output's magnitude: error / (1 + max |torch|). fp32 graphs must agree to
`TOLERANCE["fp32"]` (summation order differs between the two, ~1e-6 on the tiny models); fp16 graphs to
`TOLERANCE["fp16"]` (fp16 kernels round). fp16 graphs need ONNX Runtime's CUDA provider; where it is missing they
are reported as not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    error: float | None
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error is not None and self.error <= self.tolerance


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().float().cpu()
    difference = (actual.detach().float().cpu() - expected).abs().max().item()
    return difference / (1.0 + expected.abs().max().item())


def as_outputs(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple | list) else [result]


def run_session(path: Path, feeds: dict[str, torch.Tensor], providers: list[Any]) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers)
    arrays = session.run(None, {name: tensor.detach().cpu().numpy() for name, tensor in feeds.items()})
    return [torch.from_numpy(array) for array in arrays]


def check_export(
    model: Any, folder: Path, manifest: Any, *, progress: Callable[[str], None] | None = None,
    runners: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] | None = None,
) -> list[GraphCheck]:  # fmt: skip
    """Compare every graph of the export in `folder` with PyTorch; one `GraphCheck` per graph.

    `runners` (graph name -> runner, as `BackendParts.runners`): run the graphs through them instead of ONNX
    Runtime sessions."""
    from icdcli.engines.onnxruntime import has_cuda_provider, providers_for
    from icdcli.export.manifest import P2P_BATCH, P2P_PAIRS
    from icdcli.export.onnx import plan_graphs
    from icdcli.export.signatures import BATCH, EXAMPLE_LATENT, HEIGHT, LATENT_H, LATENT_W, WIDTH, example_inputs

    say = progress or (lambda message: None)
    precision = manifest.precision
    tolerance = TOLERANCE[precision]
    runnable = runners is not None or precision == "fp32" or (model.device.type == "cuda" and has_cuda_provider())
    providers = providers_for(model.device)
    factor = manifest.vae_scale_factor
    latent = EXAMPLE_LATENT if runners is None else int(manifest.info["native_size"]) // factor
    sizes = {BATCH: 2 if runners is None else 1, P2P_BATCH: 2, P2P_PAIRS: 1, LATENT_H: latent, LATENT_W: latent}
    sizes |= {HEIGHT: latent * factor, WIDTH: latent * factor}
    include_teacher = "teacher_unet" in manifest.graphs
    p2p = "reverse_unet_p2p" in manifest.graphs
    checks = []
    for spec, build in plan_graphs(model, precision, include_teacher=include_teacher, p2p=p2p):
        if spec.name not in manifest.graphs:
            continue
        if not runnable:
            note = "not checked: fp16 graphs need onnxruntime-gpu on a CUDA device"
            checks.append(GraphCheck(spec.name, None, tolerance, note))
            continue
        args = example_inputs(spec.inputs, sizes, model.device)
        with torch.no_grad():
            expected = as_outputs(build().eval()(*args))
        feeds = dict(zip((s.name for s in spec.inputs), args, strict=True))
        if runners is None:
            actual = run_session(folder / manifest.graphs[spec.name].file, feeds, providers)
        else:
            outputs = runners[spec.name](feeds)
            actual = [outputs[output.name] for output in spec.outputs]
        error = max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))
        checks.append(GraphCheck(spec.name, error, tolerance))
        say(f"  {spec.name}: relative error {error:.1e} (tolerance {tolerance:.0e})")
    return checks
