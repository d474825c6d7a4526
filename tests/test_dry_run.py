"""`icd edit --dry-run`: what would be edited, checked without a model: each input and its output, whether that
exists, and why an item could not run (exit 1); nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import icdcli.cli.common
from icdcli.cli.main import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]


def _icd(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture()
def no_model(monkeypatch):
    """A dry run never loads a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(icdcli.cli.common, "load_model", refuse)


def test_a_dry_run_plans_checks_and_writes_nothing(tmp_path, no_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(EXAMPLE, photos / name)
    (photos / "broken.jpg").write_bytes(b"not a picture")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b-edit.png").write_bytes(b"an earlier output")
    result = _icd("edit", photos, *PROMPTS, "-o", out, "--dry-run", "--json")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_input = {Path(line["input"]).name: line for line in lines if "input" in line}
    assert by_input["a.png"]["status"] == "planned" and by_input["a.png"]["exists"] is False
    assert by_input["a.png"]["output"] == str(out / "a-edit.png") and by_input["a.png"]["tgt"] == PROMPTS[3]
    assert by_input["b.png"]["exists"] is True
    assert by_input["broken.jpg"]["status"] == "failed" and "broken.jpg" in by_input["broken.jpg"]["error"]
    assert lines[-1] == {"status": "summary", "planned": 2, "existing": 1, "failed": 1}
    assert sorted(path.name for path in out.iterdir()) == ["b-edit.png"]
    assert "nothing was edited" in result.stderr


def test_a_dry_run_of_good_inputs_exits_0_and_names_each_output(tmp_path, no_model):
    photo = tmp_path / "photo.png"
    shutil.copy(EXAMPLE, photo)
    result = _icd("edit", photo, "--src", PROMPTS[1], "--tgt", "a dog", "--tgt", "a fox", "--format", "jpg",
                  "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "photo-edit-1.jpg" in result.stderr and "photo-edit-2.jpg" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png"]
    into = _icd("edit", photo, *PROMPTS, "-o", tmp_path / "new-folder", "--dry-run")
    assert into.exit_code == 0 and "new-folder" in into.stderr, into.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png"]  # the -o folder is not made


@pytest.mark.parametrize("extra", [["--jobs", "-"], ["--watch"], ["-o", "-"]])
def test_a_dry_run_is_for_files_and_folders(tmp_path, extra):
    result = _icd("edit", tmp_path, *PROMPTS, "--dry-run", *extra)
    assert result.exit_code == 2 and "--dry-run plans files and folders" in result.output, result.output
