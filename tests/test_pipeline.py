"""The Python entry point gives what the command line gives."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.diffusion.recipe import P2POptions
from icdcli.io.images import load_image
from icdcli.models.sources import DEFAULT_MODEL_DIR
from icdcli.pipeline import ICDEditPipeline

EXAMPLE = DEFAULT_MODEL_DIR.parent.parent / "examples" / "red-circle.png"
SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return ICDEditPipeline.from_pretrained(device="cpu")


def _cli(tmp_path, *flags) -> np.ndarray:
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.png"
    result = CliRunner().invoke(
        main, ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", TARGET, "-o", str(out), "--device", "cpu", *flags]
    )
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


def test_pipeline_equals_the_cli_with_the_models_recipe(pipe, tmp_path):
    output = pipe(load_image(EXAMPLE), SOURCE, TARGET)
    assert output.settings.method == "p2p" and output.settings.seed == 0  # the embedded model's recipe
    assert np.array_equal(np.asarray(output.images[0]), _cli(tmp_path))


@pytest.mark.slow
def test_pipeline_equals_the_cli_with_explicit_settings(pipe, tmp_path):
    p2p = P2POptions(cross_replace=0.4, self_replace=0.6, amplify=(("yellow", 2.0),), blend_target=("circle",))
    output = pipe([load_image(EXAMPLE)], SOURCE, TARGET, guidance=3.0, tau=0.7, seed=5, p2p=p2p)
    flags = ["--guidance", "3", "--tau", "0.7", "--seed", "5", "--cross-replace", "0.4", "--self-replace", "0.6",
             "--amplify", "yellow=2", "--blend-tgt", "circle"]  # fmt: skip
    assert np.array_equal(np.asarray(output.images[0]), _cli(tmp_path, *flags))
    swap = pipe(load_image(EXAMPLE), SOURCE, TARGET, method="swap")
    assert swap.settings.p2p is None
    assert np.array_equal(np.asarray(swap.images[0]), _cli(tmp_path, "--method", "swap"))
