"""A PIE-Bench run's report: its parts, Markdown tables (the benchmark's scaling in the headers), its files."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icdcli.core.values import strict_json

if TYPE_CHECKING:
    from icdcli.run.report import ItemOutcome

# the benchmark's tables print these scaled (LPIPS x 10^3, ...); JSON keeps the raw values
SCALES: dict[str, tuple[float, str]] = {
    "structure_distance": (1e3, "structure ×10³"),
    "psnr": (1.0, "PSNR"),
    "lpips": (1e3, "LPIPS ×10³"),
    "mse": (1e4, "MSE ×10⁴"),
    "ssim": (1e2, "SSIM ×10²"),
    "clip_whole": (1.0, "CLIP whole"),
    "clip_edited": (1.0, "CLIP edited"),
}


def _cell(value: Any, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value * scale:.2f}"
    return str(value)


def markdown_tables(summary: Mapping[str, Any], metrics: Sequence[str], notes: Mapping[str, str]) -> str:
    """The overall and per-type tables (PIE-Bench's scaling in the headers), then the skipped metrics."""
    headers = [SCALES[name][1] for name in metrics] + ["s/edit"]

    def line(label: list[str], values: Mapping[str, Any]) -> str:
        cells = [_cell(values.get(name), SCALES[name][0]) for name in metrics]
        seconds = values.get("seconds_per_edit")
        return (
            "| " + " | ".join([*label, str(values["n"]), *cells, "-" if seconds is None else f"{seconds:.3f}"]) + " |"
        )

    overall = ["| items | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 1)]
    overall.append(line([], summary["overall"]))
    per_type = ["| type | edit | items | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 3)]
    per_type += [line([type_id, values["name"]], values) for type_id, values in summary["per_type"].items()]
    text = "\n".join(overall) + "\n\n" + "\n".join(per_type)
    by_reason: dict[str, list[str]] = {}
    for name, reason in notes.items():
        by_reason.setdefault(reason, []).append(name)
    if by_reason:
        text += "\n\n" + "\n".join(f"skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return text


def write_report(folder: Path, report: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """`metrics.json` and `metrics.md` in the run's folder, each written atomically."""
    from icdcli.io.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "metrics.json", folder / "metrics.md")
    for path, text in zip(paths, (strict_json(report, indent=1), markdown + "\n"), strict=True):
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return paths


def edits_section(
    outcomes: Sequence[ItemOutcome], *, total: int, seconds: float, load_seconds: float
) -> dict[str, Any]:
    """The `edits` part of a report: counts by outcome, items never run, seconds and images per second."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    return {
        **counts,
        "not_run": total - len(outcomes),
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "images_per_second": round(counts["done"] / seconds, 4) if counts["done"] else None,
    }


def failures(outcomes: Sequence[ItemOutcome], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every item that could not be edited, then every output that could not be scored: its key and why."""
    edits = [{"key": o.key, "error": o.error} for o in outcomes if o.status == "failed"]
    return edits + [{"key": row["key"], "error": row["error"]} for row in rows if "error" in row]
