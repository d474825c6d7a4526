"""Edits pinned to arrays saved before a refactor: restructuring must not change what users get.

The arrays in data/reference_edits.npz are the outputs of `icd edit` (uint8, as written) for a few
methods and backends. Regenerate them only for an intended change of output:
    python tests/test_reference_edits.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main

REFERENCE = Path(__file__).parent / "data" / "reference_edits.npz"
EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"

CASES: dict[str, list[str]] = {
    "p2p-recipe": [],
    "swap": ["--method", "swap"],
    "p2p-blend": ["--blend-tgt", "circle", "--seed", "3"],
    "ddim-p2p": ["--sampler", "ddim", "--ddim-steps", "10"],
    "onnxruntime-p2p": ["--backend", "onnxruntime"],
}
# uint8 outputs of float pipelines: kernels differ between CPUs by a few ulps, which may flip a rounding
MAX_DIFFERENCE, MAX_MEAN_DIFFERENCE = 3, 0.25


def run_case(flags: list[str], out: Path) -> np.ndarray:
    args = ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", TARGET, "-o", str(out), "--device", "cpu", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=pytest.mark.slow) if "onnxruntime" in case else case for case in sorted(CASES)]
)
def test_edit_matches_its_reference(case, tmp_path):
    if "onnxruntime" in case:
        pytest.importorskip("onnxruntime")
    expected = np.load(REFERENCE)[case]
    edited = run_case(CASES[case], tmp_path / f"{case}.png")
    difference = np.abs(edited.astype(int) - expected.astype(int))
    assert edited.shape == expected.shape
    assert difference.max() <= MAX_DIFFERENCE and difference.mean() <= MAX_MEAN_DIFFERENCE, (
        f"{case}: max {difference.max()}, mean {difference.mean():.3f}"
    )


def write_references() -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.environ["ICD_CACHE_DIR"] = str(Path(folder) / "cache")
        arrays = {case: run_case(flags, Path(folder) / f"{case}.png") for case, flags in CASES.items()}
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({', '.join(arrays)})")


if __name__ == "__main__" and "--write" in sys.argv:
    write_references()
