"""The rows of `icd bench scale`: `--backends name[:precision],...`, and what each row loads, exports and runs.

A plain name takes `--precision`; `openvino:bf16` names its own. Rows that run an ONNX export at any precision
(OpenVINO, and the int8 rows) load the PyTorch model in fp32 from the full-precision fused cache, so every such row
reads one fp32 export and their parity against the fp32 reference measures the engine and its precision alone.
Nothing heavy is imported here: the command line checks `--backends` with it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from icdcli.core.errors import ICDError

ROW_BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ROW_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
HALF = ("fp16", "bf16")


@dataclass(frozen=True)
class RowSpec:
    """One row: a backend at a precision, labelled as it was written (`onnxruntime`, `openvino:bf16`)."""

    backend: str
    precision: str
    label: str

    @property
    def load_precision(self) -> str:
        """The PyTorch model's precision: fp32 for rows that run the fp32 export (OpenVINO, int8), else the row's."""
        return "fp32" if self.backend == "openvino" or self.precision == "int8" else self.precision

    @property
    def half_cache(self) -> bool:
        """Whether the row reads the fused cache in half precision (as `icd edit --precision fp16/bf16` does)."""
        return self.load_precision in HALF

    @property
    def exports(self) -> bool:
        return self.backend != "torch"


def parse_row(entry: str, default_precision: str) -> RowSpec:
    """`name` or `name:precision` (one `--backends` entry); ICDError in one line naming the choices."""
    text = entry.strip().lower()
    name, colon, precision = text.partition(":")
    name, precision = name.strip(), precision.strip()
    if name not in ROW_BACKENDS:
        raise ICDError(f"unknown backend {name!r} in --backends {entry.strip()!r}: choose {', '.join(ROW_BACKENDS)}")
    if colon and precision not in ROW_PRECISIONS:
        raise ICDError(
            f"unknown precision {precision!r} in --backends {entry.strip()!r}: choose {', '.join(ROW_PRECISIONS)}"
        )
    if not colon and default_precision not in ROW_PRECISIONS:
        raise ICDError(f"unknown --precision {default_precision!r}: choose {', '.join(ROW_PRECISIONS)}")
    return RowSpec(name, precision if colon else default_precision, f"{name}:{precision}" if colon else name)


def parse_rows(entries: str | tuple[str, ...] | list[str], default_precision: str) -> tuple[RowSpec, ...]:
    """Every row of `--backends` (a comma-separated string or its entries), in order; a row listed twice (the same
    backend at the same precision) or none at all is an ICDError."""
    if isinstance(entries, str):
        entries = entries.split(",")
    rows: list[RowSpec] = []
    for entry in (entry for entry in entries if entry.strip()):
        row = parse_row(entry, default_precision)
        twin = next((seen for seen in rows if (seen.backend, seen.precision) == (row.backend, row.precision)), None)
        if twin is not None:
            raise ICDError(f"--backends lists {row.backend} at {row.precision} twice ({twin.label}, {row.label})")
        rows.append(row)
    if not rows:
        raise ICDError(f"--backends names no backend: give one or more of {', '.join(ROW_BACKENDS)}")
    return tuple(rows)


def reference_label(labels: list[str], precisions: dict[str, str]) -> str | None:
    """The row the others are compared with: the first fp32 row, else the first row (None: no row ran)."""
    return next((label for label in labels if precisions[label] == "fp32"), labels[0] if labels else None)


def int8_skip_reason(backend: str, device: str) -> str | None:
    """Why an int8 row cannot run (None: it can): int8 is OpenVINO's NNCF weight compression and ONNX Runtime's
    dynamic quantization, on the CPU."""
    import importlib.util

    if backend not in ("openvino", "onnxruntime"):
        return f"{backend} has no int8 here: int8 rows are openvino (NNCF weights) and onnxruntime (dynamic)"
    if device != "cpu":
        return "int8 rows run on the CPU: use --device cpu"
    if backend == "openvino" and importlib.util.find_spec("nncf") is None:
        return 'OpenVINO int8 needs nncf: pip install "icd[openvino-int8]"'
    if backend == "onnxruntime" and importlib.util.find_spec("onnx") is None:
        return "ONNX Runtime int8 needs onnx: pip install 'icd[onnx]'"
    return None


def backend_skip_reason(backend: str, precision: str, device: str) -> str | None:
    """Why a backend row (`backend` at `precision`) cannot run here, or None."""
    import torch

    from icdcli.backends.accelerated import backend_problem, probe_backends

    try:
        problem = backend_problem(backend, probe_backends(torch.device(device)))
    except ICDError as error:
        return str(error)
    if problem:
        return problem
    if precision == "int8":
        return int8_skip_reason(backend, device)
    if backend == "onnxruntime" and precision != "fp32" and device == "cpu":
        return f"ONNX Runtime's CPU provider has no {precision} kernels for these graphs: use --precision fp32"
    if backend == "onnxruntime" and precision == "bf16":
        return "icd exports fp32 and fp16 graphs only"
    if backend == "openvino":
        return openvino_skip_reason(precision)
    return None


def openvino_skip_reason(precision: str) -> str | None:
    """OpenVINO runs the fp32 export at fp32, at bf16 where the CPU has it, or with int8 weights. The CPU's flags
    are read from the system (`icdcli.core.cpu`): this process never loads OpenVINO."""
    from icdcli.core.cpu import cpu_has_bf16

    if precision == "fp16":
        return "OpenVINO runs the fp32 export at fp32, bf16 or int8 on the CPU: use openvino:fp32, :bf16 or :int8"
    if precision == "bf16" and cpu_has_bf16() is False:
        return "this CPU lacks bf16 (AVX512-BF16 or AMX): use openvino:fp32"
    return None
