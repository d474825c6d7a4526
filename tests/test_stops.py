"""Orderly stops release every claim and count what they never reached; SIGTERM before the first item edits
nothing; usage errors exit 2; failures name the flag and the input they concern."""

import errno
import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main


def _photos(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng(index)
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


def _lines(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith("."))


def test_a_full_disk_at_the_claims_leaves_no_claim_and_the_summary_adds_up(merged_dir, tmp_path, one_model,
                                                                          monkeypatch):  # fmt: skip
    """The claim file is created (a full disk still has inodes) but its line cannot be written: before, every
    read-ahead item left its `.icd-claim` behind and the next run reported them as a killed run's."""
    import icdcli.io.claims

    photos = _photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    real_write = os.write

    def full(fd, data):
        if data.endswith(b"\n") and data.strip().isdigit():  # a claim's process id
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(icdcli.io.claims.os, "write", full)
    command = ["edit", str(photos), "--src", "a cat", "--tgt", "a dog", "--model", str(merged_dir), "-o", str(out)]
    result = CliRunner().invoke(main, [*command, "--json"])
    assert result.exit_code == 1 and "no space left" in result.stderr and "Traceback" not in result.output
    summary = _lines(result)[-1]
    assert summary["status"] == "summary" and summary["done"] == 0 and summary["failed"] >= 1
    assert summary["done"] + summary["skipped"] + summary["failed"] + summary["not_reached"] == 6, summary
    assert "not reached" in result.stderr
    assert _leftovers(out) == []  # no claim left behind
    monkeypatch.setattr(icdcli.io.claims.os, "write", real_write)
    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0 and "killed" not in again.stderr, again.output
    assert sorted(p.name for p in out.iterdir()) == [f"p{index}-edit.png" for index in range(6)]


def test_a_fatal_write_failure_releases_every_claim_and_counts_the_rest(merged_dir, tmp_path, one_model,
                                                                       monkeypatch):  # fmt: skip
    import icdcli.io.images

    photos = _photos(tmp_path / "in", 5)
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "x.png"))

    monkeypatch.setattr(icdcli.io.images, "save_image", full)
    result = CliRunner().invoke(main, ["edit", str(photos), "--src", "a cat", "--tgt", "a dog", "--model",
                                       str(merged_dir), "-o", str(out), "--json", "--batch-size", "1"])  # fmt: skip
    assert result.exit_code == 1 and "no space left" in result.stderr
    summary = _lines(result)[-1]
    assert summary["done"] + summary["skipped"] + summary["failed"] + summary["not_reached"] == 5, summary
    assert summary["not_reached"] >= 1
    assert not out.exists() or _leftovers(out) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_edits_nothing(merged_dir, tmp_path, module_model, monkeypatch, signum, code):
    """Before, SIGTERM while the model loaded let the first image be edited although none had started."""
    import icdcli.models.sources

    def loading(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return module_model

    monkeypatch.setattr(icdcli.models.sources, "load_requested_model", loading)
    photos = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["edit", str(photos), "--src", "a cat", "--tgt", "a dog", "--model",
                                       str(merged_dir), "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == code, result.output
    summary = _lines(result)[-1]
    assert summary["done"] == 0 and summary["not_reached"] == 3, summary
    assert not out.exists() or list(out.iterdir()) == []


def test_sigterm_while_jobs_load_the_model_exits_143(merged_dir, tmp_path, module_model, monkeypatch):
    import icdcli.models.sources

    def loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return module_model

    monkeypatch.setattr(icdcli.models.sources, "load_requested_model", loading)
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    line = json.dumps({"image": str(photo), "src": "a cat", "tgt": "a dog"}) + "\n"
    result = CliRunner().invoke(main, ["edit", "--jobs", "-", "--model", str(merged_dir)], input=line)
    assert result.exit_code == 143 and not (photo.parent / "p0-edit.png").exists()


def test_usage_errors_exit_2(merged_dir, tmp_path, one_model):
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    model = ["--model", str(merged_dir)]
    cases = [
        ["edit", str(photo), "--src", "a cat", *model],  # no --tgt
        ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "-o", str(photo), *model],  # -o onto the input
        ["edit", *model, "--src", "a", "--tgt", "b"],  # nothing to edit
        ["edit", "--jobs", "-", str(photo), *model],
        ["invert", str(photo), "--prompt", "a cat", "--reconstruct", str(photo), *model],  # onto the input
        ["invert", str(photo), "--prompt", "a cat", "-o", str(tmp_path / "x.bin"), *model],
    ]
    for args in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    onto = CliRunner().invoke(main, cases[4])
    assert "--reconstruct" in onto.stderr and "-o " not in onto.stderr
    assert sorted(p.name for p in photo.parent.iterdir()) == ["p0.png"]


def test_reconstruct_onto_a_foreign_file_names_reconstruct(merged_dir, tmp_path, one_model):
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    foreign = tmp_path / "mine.png"
    Image.new("RGB", (8, 8)).save(foreign)
    result = CliRunner().invoke(main, ["invert", str(photo), "--prompt", "a cat", "--reconstruct", str(foreign),
                                       "--model", str(merged_dir)])  # fmt: skip
    assert result.exit_code == 1 and "not made by icd invert" in result.stderr
    assert "choose another --reconstruct" in result.stderr and "another -o" not in result.stderr


def test_a_failed_spec_row_and_jobs_line_keep_their_image_in_input(merged_dir, tmp_path, one_model):
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    spec = tmp_path / "spec.jsonl"
    spec.write_text(
        "\n".join(
            [
                json.dumps({"image": "in/p0.png", "src": "a cat", "tgt": "a dog", "seed": -1}),
                json.dumps({"image": "in/p0.png", "src": "a cat", "tgt": "a dog", "colour": 1}),
            ]
        )
    )
    result = CliRunner().invoke(main, ["edit", "--spec", str(spec), "--model", str(merged_dir), "--json"])
    failed = [line for line in _lines(result) if line["status"] == "failed"]
    assert failed[0]["input"] == str(tmp_path / "in" / "p0.png"), failed
    line = json.dumps({"image": str(photo), "src": "a cat", "tgt": "a dog", "tau": 7}) + "\n"
    jobs = CliRunner().invoke(main, ["edit", "--jobs", "-", "--model", str(merged_dir)], input=line)
    (record,) = _lines(jobs)
    assert record["status"] == "failed" and record["input"] == str(photo) and "tau" in record["error"]
