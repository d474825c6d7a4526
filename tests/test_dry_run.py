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
    assert by_input["b.png"]["status"] == "failed" and "exists and was not made by icd" in by_input["b.png"]["error"]
    assert by_input["broken.jpg"]["status"] == "failed" and "broken.jpg" in by_input["broken.jpg"]["error"]
    assert lines[-1] == {"status": "summary", "planned": 1, "existing": 0, "failed": 2}
    overwrite = _icd("edit", photos, *PROMPTS, "-o", out, "--dry-run", "--json", "--overwrite")
    assert [json.loads(line) for line in overwrite.stdout.splitlines()][-1] == {
        "status": "summary", "planned": 2, "existing": 1, "failed": 1
    }  # fmt: skip
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
    into = _icd("edit", photo, *PROMPTS, "-o", f"{tmp_path / 'new-folder'}/", "--dry-run")
    assert into.exit_code == 0 and "new-folder" in into.stderr, into.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png"]  # the -o folder is not made


@pytest.mark.parametrize("extra", [["--jobs", "-"], ["--watch"], ["-o", "-"]])
def test_a_dry_run_is_for_files_and_folders(tmp_path, extra):
    result = _icd("edit", tmp_path, *PROMPTS, "--dry-run", *extra)
    assert result.exit_code == 2 and "--dry-run plans files and folders" in result.output, result.output


def test_a_dry_run_fails_what_the_run_would_refuse_and_the_run_refuses_it_before_loading(tmp_path, no_model):
    """An existing output icd did not make, an output type icd cannot write, an output that is a folder: the dry
    run says so (exit 1), and the run itself fails them while planning, before any model loads."""
    photo = tmp_path / "x.png"
    shutil.copy(EXAMPLE, photo)
    shutil.copy(EXAMPLE, tmp_path / "x-edit.png")  # the user's own file at the default output
    foreign = _icd("edit", photo, *PROMPTS, "--dry-run")
    assert foreign.exit_code == 1 and "x-edit.png exists and was not made by icd edit" in foreign.stderr
    replaced = _icd("edit", photo, *PROMPTS, "--dry-run", "--overwrite")
    assert replaced.exit_code == 0 and "(exists: replaced, --overwrite)" in replaced.stderr, replaced.output
    for output, says in ((tmp_path / "out.tif", "out.tif: unsupported output type; use one of"),
                         (tmp_path / "plain", "unsupported output type; use one of .jpeg, .jpg, .png, .webp; a folder "
                                              "ends in /")):  # fmt: skip
        for extra in (["--dry-run"], []):
            result = _icd("edit", photo, *PROMPTS, "-o", output, *extra)
            assert result.exit_code == 1 and says in result.stderr, result.output
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x-edit.png").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "folder" / "x.png")
    for extra in (["--dry-run"], ["--overwrite"]):
        result = _icd("edit", tmp_path / "folder", *PROMPTS, *extra)
        assert result.exit_code == 1 and "its output" in result.stderr and "is a folder" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "x-edit.png", "x.png"]
