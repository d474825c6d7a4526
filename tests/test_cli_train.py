import json

import pytest
from click.testing import CliRunner

from icdcli.cli import main
from icdcli.cli_train import variant_settings


def test_variant_settings():
    assert variant_settings("cd4") == {
        "forward_preservation": 0.0,
        "reverse_preservation": 0.0,
        "boundaries": "4step-tau0.8",
    }
    assert variant_settings("cd4+lf")["forward_preservation"] == 1.5
    assert variant_settings("cd4+lf+lr")["reverse_preservation"] == 1.5
    assert variant_settings("cd3")["boundaries"] == "3step-tau0.7"
    two = variant_settings("cd2")
    assert (two["forward_boundaries"], two["reverse_boundaries"]) == ((19, 499), (499, 999))
    for bad in ("cd5", "cd4+lr", "ddim50", ""):
        with pytest.raises(Exception, match="expected cd2"):
            variant_settings(bad)


def test_train_smoke_packages_a_model_that_edits(tmp_path):
    """The whole chain at smoke scale, then a variant on the same teacher; both packaged folders load and edit."""
    from PIL import Image

    from icdcli.training.scenes import Scene

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(run), "--smoke"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "model" / "icd.json").read_text())
    assert manifest["format"] == "lora" and manifest["forward_lora"] == "forward-19-259-519-779.safetensors"
    variant = CliRunner().invoke(main, ["train", str(run), "--smoke", "--variant", "cd2"])
    assert variant.exit_code == 0, variant.output
    assert (
        json.loads((run / "variants" / "cd2" / "icd.json").read_text())["reverse_lora"] == "reverse-499-999.safetensors"
    )
    photo = tmp_path / "scene.png"
    Image.fromarray(Scene("circle", "red", "blue", 0.5, 0.5, 0.5).render(32)).save(photo)
    for folder in (run / "model", run / "variants" / "cd2"):
        out = str(tmp_path / f"{folder.name}.png")
        edited = CliRunner().invoke(
            main, ["edit", str(photo), "--src", "a red circle on a blue background", "--tgt",
                   "a green circle on a blue background", "--model", str(folder), "-o", out],
        )  # fmt: skip
        assert edited.exit_code == 0, edited.output
        assert Image.open(tmp_path / f"{folder.name}.png").size == (32, 32)
