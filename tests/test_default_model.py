"""The model shipped in the package, used for real: it loads, fuses, and edits the bundled example."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.models.sources import DEFAULT_MODEL_DIR

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
COLOURS = {"red": (220, 40, 40), "yellow": (240, 220, 40), "blue": (40, 80, 220)}


def _nearest(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((pixel - np.asarray(COLOURS[name])) ** 2)))


def test_default_model_is_small_and_self_describing():
    manifest = json.loads((DEFAULT_MODEL_DIR / "icd.json").read_text())
    assert manifest["format"] == "lora" and manifest["reverse_lora"] == "reverse-259-519-779-999.safetensors"
    size = sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.rglob("*") if path.is_file())
    assert size < 25_000_000


def test_default_model_recolours_the_example(tmp_path):
    out = tmp_path / "edited.png"
    result = CliRunner().invoke(
        main,
        ["edit", str(EXAMPLE), "--src", "a red circle on a blue background", "--tgt",
         "a yellow circle on a blue background", "-o", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[0])["model"] == "default"
    edited = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert edited.shape == (128, 128, 3)
    centre, corner = edited[48:80, 48:80].reshape(-1, 3).mean(0), edited[:16, :16].reshape(-1, 3).mean(0)
    assert _nearest(centre) == "yellow", centre
    assert _nearest(corner) == "blue", corner
