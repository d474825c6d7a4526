"""`icd bench scale`'s parity and tables: each row's edit against the reference row's, and the markdown report.

The reference is the first fp32 row that ran (else the first row). Each row's `parity` holds the largest absolute
difference of its clean latents (before the VAE), the largest and the mean absolute difference of its uint8 pixels
(0-255), and whether that mean is within the bound (3/255 over the whole edit). The report's `parity` keeps the
summary earlier reports had: the largest latent and pixel difference of any row from the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PIXEL_MEAN_BOUND = 3.0
"""Mean absolute difference of an edit's pixels from the reference's, on the 0-255 scale, that counts as parity."""


def _arrays(path: Path) -> tuple[Any, Any]:
    import numpy as np

    return np.load(path.with_suffix(".latents.npy")), np.load(path.with_suffix(".pixels.npy"))


def row_parity(outputs: dict[str, Path], reference: str | None = None) -> dict[str, dict[str, Any]]:
    """Per row of `outputs` (label -> where its edit's arrays are): its differences from `reference` (default: the
    first row). The reference row's own entry is all zeros."""
    import numpy as np

    if not outputs:
        return {}
    reference = reference or next(iter(outputs))
    base_latents, base_pixels = _arrays(outputs[reference])
    result = {}
    for label, path in outputs.items():
        latents, pixels = _arrays(path)
        gap = np.abs(pixels.astype(np.int16) - base_pixels.astype(np.int16))
        mean = round(float(gap.mean()), 4)
        result[label] = {
            "reference": reference,
            "latents_max": float(np.abs(latents - base_latents).max()),
            "pixels_max": int(gap.max()),
            "pixels_mean": mean,
            "within_bound": mean <= PIXEL_MEAN_BOUND,
        }
    return result


def parity(outputs: dict[str, Path], reference: str | None = None) -> dict[str, Any]:
    """Largest absolute difference of any row's edit from the reference row's (default: the first): latents and
    0-255 pixels."""
    if len(outputs) < 2:
        return {"latents": None, "pixels": None, "reference": reference or next(iter(outputs), None)}
    rows = row_parity(outputs, reference)
    others = [entry for label, entry in rows.items() if label != entry["reference"]]
    return {
        "reference": others[0]["reference"],
        "latents": max(entry["latents_max"] for entry in others),
        "pixels": max(entry["pixels_max"] for entry in others),
    }


TABLE_STAGES = ("load", "export", "text_encoder", "vae_encode", "unet_eval", "encode", "decode", "vae_decode", "edit")
PARITY_HEAD = ("latents max", "pixels max", "pixels mean", "within 3/255")


def _parity_cells(row: dict[str, Any]) -> list[str]:
    entry = row.get("parity")
    if entry is None:
        return [""] * len(PARITY_HEAD)
    if entry["reference"] == row.get("row"):
        return ["reference", "", "", ""]
    return [f"{entry['latents_max']:.3g}", str(entry["pixels_max"]), f"{entry['pixels_mean']:.2f}",
            "yes" if entry["within_bound"] else "NO"]  # fmt: skip


def _row_cells(row: dict[str, Any]) -> list[str]:
    cells = [row["backend"] + (" (low memory)" if row.get("low_memory") else ""), row["precision"]]
    cells += ["" if row["seconds"].get(s) is None else f"{row['seconds'][s]:.2f}" for s in TABLE_STAGES]
    cells += [f"{row['peak_rss_gb']:.2f}", f"{row.get('peak_anon_gb') or 0:.2f}"]
    return cells + _parity_cells(row)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as the tables docs/benchmarks.md shows: a row per backend and precision, with its parity."""
    head = ["backend", "precision", *[f"{s} s" for s in TABLE_STAGES], "peak RSS GB", "peak anon GB", *PARITY_HEAD]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in report["rows"]]
    parity_line = report.get("parity") or {}
    lines.append("")
    lines.append(f"arch {report['arch']}, {report['size']} px, width x{report['width_scale']:g}; stages: "
                 + ", ".join(f"{k} {v}" for k, v in report["stages"].items() if v is not None))  # fmt: skip
    lines.append(f"disk GB: {report.get('disk_gb')}; files GB: {report['files_gb']}")
    lines.append(f"parity vs {parity_line.get('reference')}: latents {parity_line.get('latents')}, "
                 f"pixels {parity_line.get('pixels')} (the largest of any row; per row in the table)")  # fmt: skip
    for name, reason in {**report["skipped"], **report["failures"]}.items():
        lines.append(f"{name}: {reason}")
    return "\n".join(lines)
