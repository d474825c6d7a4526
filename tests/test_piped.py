"""`icd edit -` reads the image from stdin and `-o -` writes the edit to stdout, for pipelines: the same pixels as a
file edit, the piped ends named stdin and stdout (never a temporary path), one-line usage errors for the forms that
cannot be piped, and no temporary folder left behind."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]


def _pipe_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("icd-pipe-*")}


def _icd(*args: object, stdin: bytes | None = None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=stdin)


@pytest.fixture(scope="module")
def by_file(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("by-file") / "edit.png"
    result = _icd("edit", EXAMPLE, *PROMPTS, "-o", out, "--backend", "torch")
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


def test_stdin_to_stdout_is_the_file_edit(by_file):
    before = _pipe_folders()
    result = _icd("edit", "-", *PROMPTS, "-o", "-", "--backend", "torch", stdin=EXAMPLE.read_bytes())
    assert result.exit_code == 0, result.stderr
    edited = Image.open(io.BytesIO(result.stdout_bytes))
    assert np.array_equal(np.asarray(edited.convert("RGB")), by_file)
    record = json.loads(edited.text["icd"])
    assert record["input"] == "-" and record["tgt"] == PROMPTS[3]
    assert "wrote stdout" in result.stderr and "icd-pipe" not in result.stderr and "stdin-edit" not in result.stderr
    assert _pipe_folders() == before


def test_a_file_to_stdout_and_stdin_to_a_file(tmp_path, by_file):
    to_stdout = _icd("edit", EXAMPLE, *PROMPTS, "-o", "-", "--backend", "torch")
    assert to_stdout.exit_code == 0 and to_stdout.stdout_bytes.startswith(b"\x89PNG"), to_stdout.stderr
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(to_stdout.stdout_bytes)).convert("RGB")), by_file)

    out = tmp_path / "piped.png"
    args = ["edit", "-", *PROMPTS, "-o", out, "--backend", "torch", "--json"]
    made = _icd(*args, stdin=EXAMPLE.read_bytes())
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["input"] == "-" and json.loads(Image.open(out).text["icd"])["input"] == "-"
    again = _icd(*args, stdin=EXAMPLE.read_bytes())  # the same bytes and settings: already made
    assert json.loads(again.stdout)["status"] == "skipped"
    other = Image.open(EXAMPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    other.save(buffer, format="PNG")
    refused = _icd(*args, stdin=buffer.getvalue())  # another image: not replaced without --overwrite
    assert refused.exit_code == 1 and json.loads(refused.stdout.splitlines()[0])["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "stdin", "code", "words"),
    [
        (["-", "-o", "-"], b"", 1, "stdin is empty: pipe an image in"),
        (["-", "-o", "-"], b"not an image", 1, "Error: stdin: not an image file that can be read"),
        (["-"], b"x", 2, "IMAGE - needs -o: a file to write, or - for stdout"),
        (["-", str(EXAMPLE), "-o", "x.png"], b"x", 2, "IMAGE - reads one image from stdin: give it alone"),
        ([str(EXAMPLE), str(EXAMPLE), "-o", "-"], None, 2, "-o - writes one edit to stdout: give one IMAGE"),
        ([str(EXAMPLE), "-o", "-", "--json"], None, 2, "where --json's records would go: leave --json out"),
        (["-", "-o", "-", "-r"], b"x", 2, "IMAGE - and -o - edit one piped image: leave out -r"),
    ],
)
def test_forms_that_cannot_be_piped_are_one_line_errors(args, stdin, code, words):
    before = _pipe_folders()
    result = _icd("edit", *args, *PROMPTS, "--backend", "torch", stdin=stdin)
    assert result.exit_code == code and words in result.stderr, result.output
    assert "Traceback" not in result.output and "icd-pipe" not in result.output
    assert not result.stdout_bytes.startswith(b"\x89PNG")
    assert _pipe_folders() == before


def test_repeating_an_edit_whose_input_came_on_stdin_asks_for_the_image(tmp_path):
    out = tmp_path / "piped.png"
    assert _icd("edit", "-", *PROMPTS, "-o", out, "--backend", "torch", stdin=EXAMPLE.read_bytes()).exit_code == 0
    again = _icd("edit", "--from", out, "-o", tmp_path / "again.png", "--backend", "torch")
    assert again.exit_code == 1 and "its input came on stdin; give the IMAGE file to edit" in again.stderr
    given = _icd("edit", EXAMPLE, "--from", out, "-o", tmp_path / "again.png", "--backend", "torch")
    assert given.exit_code == 0, given.output


def test_generate_writes_its_png_to_stdout(tmp_path):
    piped = _icd("generate", "a red circle on a blue background", "-o", "-", "--backend", "torch")
    assert piped.exit_code == 0 and "wrote stdout" in piped.stderr, piped.output
    out = tmp_path / "file.png"
    to_file = _icd("generate", "a red circle on a blue background", "-o", out, "--backend", "torch")
    assert to_file.exit_code == 0 and piped.stdout_bytes == out.read_bytes()  # the same PNG, record and all
    refused = _icd("generate", "a red circle", "-o", "-", "--json")
    assert refused.exit_code == 2 and "leave --json out" in refused.stderr


def test_a_piped_outputs_record_names_its_files_by_absolute_paths(tmp_path, monkeypatch):
    """Written from a private folder, the record cannot name the input or mask relative to the output's folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(EXAMPLE.read_bytes())
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 0, 128, 128))
    mask.save(tmp_path / "mask.png")
    result = _icd("edit", "photo.png", *PROMPTS, "--mask", "mask.png", "-o", "-", "--backend", "torch")
    assert result.exit_code == 0, result.stderr
    (tmp_path / "piped.png").write_bytes(result.stdout_bytes)
    record = json.loads(Image.open(tmp_path / "piped.png").text["icd"])
    assert record["input"] == str(tmp_path / "photo.png") and record["mask"] == str(tmp_path / "mask.png")
    again = _icd("edit", "--from", tmp_path / "piped.png", "-o", tmp_path / "again.png", "--backend", "torch")
    assert again.exit_code == 0, again.output
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "piped.png"))
    )
