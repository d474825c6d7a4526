"""`icd bench gpu`'s options and report: the rows a run will try (each not reached until its step runs), the JSON file
written after every step, and the readable table printed without --json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdcli.diffusion.recipe import SD15, SDXL

FORMAT = 1
ARCHS = (SD15, SDXL)
MODES = ("eager", "graphs", "compile")
METHODS = ("eval", "swap", "p2p")
EVAL_BATCHES = (1, 2)
NOT_REACHED = "not reached: the run stopped before this step (killed, timed out or crashed)"
STARTED = "started but did not finish: the run stopped during this step (killed, timed out or crashed)"


@dataclass
class GpuOptions:
    """What `icd bench gpu` was asked for."""

    archs: tuple[str, ...] = (SD15,)
    device: str = "cuda"
    width: float = 1.0
    size: int | None = None  # None: the architecture's (512 or 1024)
    modes: tuple[str, ...] = MODES
    repeats: int = 3
    eval_repeats: int = 10
    time_limit: float = 420.0
    seed: int = 0
    parity: bool = True
    out: Path | None = None


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write `report` to `out` as strict JSON, atomically (a temporary file beside it, then renamed)."""
    from icdcli.core.values import strict_json
    from icdcli.io.atomic import atomic_path

    with atomic_path(out) as temporary:
        temporary.write_text(strict_json(report, indent=2) + "\n")


def row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["arch"], row["mode"], row["method"], row["batch"]


def planned_rows(options: GpuOptions) -> list[dict[str, Any]]:
    """Every row the run will try, in order, each `skipped` as not reached until its step runs."""
    rows = []
    for arch in options.archs:
        for mode in options.modes:
            for method in METHODS:
                for batch in EVAL_BATCHES if method == "eval" else (1,):
                    rows.append({"arch": arch, "mode": mode, "method": method, "batch": batch, "size": None,
                                 "status": "skipped", "reason": NOT_REACHED, "seconds": None,
                                 "first_call_seconds": None, "repeats": 0, "stages": {}, "peak_memory_gb": None,
                                 "notes": []})  # fmt: skip
    return rows


def planned_parity(options: GpuOptions) -> dict[str, list[dict[str, Any]]]:
    def entry(arch: str) -> dict[str, Any]:
        return {"arch": arch, "status": "skipped", "reason": NOT_REACHED}

    return {"eval": [entry(arch) for arch in options.archs], "edit_pixels": [entry(arch) for arch in options.archs]}


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def text_report(report: dict[str, Any]) -> str:
    """The report as a readable table (what `icd bench gpu` prints without --json)."""
    versions = report.get("versions") or {}
    lines = [
        f"device: {report.get('device')} ({report.get('precision')}); torch {versions.get('torch')}, CUDA "
        f"{versions.get('cuda')}, driver {versions.get('driver')}, diffusers {versions.get('diffusers')}, python "
        f"{versions.get('python')}",
        "",
        "| arch | mode | method | batch | size | status | seconds | first call s | encode s | decode s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reasons: dict[str, int] = {}  # each reason once, numbered
    for row in report["rows"]:
        stages = row.get("stages") or {}
        status = row["status"]
        if status != "ran":
            status += f" [{reasons.setdefault(row.get('reason') or '', len(reasons) + 1)}]"
        cells = [row["arch"], row["mode"], row["method"], row["batch"], row.get("size"), status, row.get("seconds"),
                 row.get("first_call_seconds"), stages.get("encode"), stages.get("decode"),
                 row.get("peak_memory_gb")]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    for reason, index in reasons.items():
        lines.append(f"[{index}] {reason}")
    for kind, entries in report["parity"].items():
        for entry in entries:
            if entry["status"] == "ran":
                shown = {k: _cell(v) for k, v in entry.items() if k not in ("arch", "status", "reason", "notes")}
                lines.append(f"parity {kind} {entry['arch']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
            else:
                lines.append(f"parity {kind} {entry['arch']}: {entry['status']}: {entry['reason']}")
    for name, entry in (report.get("backends") or {}).items():
        lines.append(f"{name}: {entry['status']}: {entry['reason']}")
    for arch, build in (report.get("builds") or {}).items():
        if build.get("status") == "ran":
            lines.append(f"build {arch}: {build['seconds']} s, parameters (M) {build.get('parameters_m')}")
        else:
            lines.append(f"build {arch}: {build.get('status')}: {build.get('reason')}")
    for row in report["rows"]:
        for note in row.get("notes") or []:
            lines.append(f"note {row['arch']} {row['mode']} {row['method']}: {note}")
    return "\n".join(lines)
