"""`icd edit FOLDER --watch`: a hot folder. The images there are edited, then each new or changed image file once
nothing has written to it for a second; icd's own outputs are left out; Ctrl-C ends it with the summary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import icdcli.run.watch as watch_module
from icdcli.cli.main import main
from icdcli.io.images import read_record
from icdcli.run.inputs import EditFlags
from icdcli.run.watch import FolderWatch, watched_items

EXAMPLES = Path(__file__).parent.parent / "examples"
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _touch(path: Path, when: float, data: bytes = b"x") -> None:
    path.write_bytes(data)
    os.utime(path, (when, when))


def test_a_file_is_handed_out_once_it_has_settled_and_again_when_it_changes(tmp_path):
    clock = Clock()
    watch = FolderWatch([tmp_path], recursive=False, settle=1.0, clock=clock)
    _touch(tmp_path / "old.png", clock.now - 60)
    _touch(tmp_path / "new.png", clock.now)  # being written
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _touch(tmp_path / "sub" / "deep.png", clock.now - 60)
    assert [path.name for _, path in watch.ready()] == ["old.png"]
    assert watch.ready() == []
    clock.now += 1.5
    assert [path.name for _, path in watch.ready()] == ["new.png"]
    _touch(tmp_path / "old.png", clock.now - 5, b"changed")  # replaced by another photo
    assert [path.name for _, path in watch.ready()] == ["old.png"]
    assert watch.ready() == []
    deep = FolderWatch([tmp_path], recursive=True, settle=1.0, clock=clock)
    assert {path.name for _, path in deep.ready()} == {"old.png", "new.png", "deep.png"}


def test_a_file_dated_in_the_future_is_handed_out_once_two_looks_find_it_unchanged(tmp_path):
    clock = Clock()
    watch = FolderWatch([tmp_path], recursive=False, settle=1.0, clock=clock)
    _touch(tmp_path / "ahead.png", clock.now + 3600)  # another machine's clock, an archive's times
    assert watch.ready() == []
    clock.now += 0.5
    assert watch.ready() == []  # unchanged, but not yet for `settle` seconds
    clock.now += 1.0
    assert [path.name for _, path in watch.ready()] == ["ahead.png"]
    assert watch.ready() == []


def test_a_folder_watched_under_two_names_hands_each_file_out_once(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    clock = Clock()
    _touch(tmp_path / "in" / "a.png", clock.now - 60)
    watch = FolderWatch([tmp_path / "in", tmp_path / "alias", tmp_path / "in"], recursive=False, clock=clock)
    assert [(folder.name, path.name) for folder, path in watch.ready()] == [("in", "a.png")]
    assert watch.ready() == []


def test_watched_items_leave_out_icds_outputs_and_mirror_subfolders(tmp_path):
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "red-circle.png", source / "sub" / "a.png")
    made = CliRunner().invoke(main, ["edit", str(source / "sub" / "a.png"), *PROMPTS])
    assert made.exit_code == 0, made.output
    found = FolderWatch([source], recursive=True, settle=0.0).ready()
    assert {path.name for _, path in found} == {"a.png", "a-edit.png"}
    flags = EditFlags(PROMPTS[1], PROMPTS[3])
    items = watched_items(found, flags, targets=(), output=str(tmp_path / "out"), any_output=False)
    assert [(item.image.name, item.output) for item in items] == [("a.png", tmp_path / "out" / "sub" / "a-edit.png")]


def test_a_file_arriving_later_whose_default_output_clashes_is_named_as_a_rerun_would(tmp_path):
    """x.jpg is edited first; x.png arrives a look later: it goes to x-png-edit.png, as a folder run of both
    would name it, rather than being refused for x-edit.png."""
    clock = Clock()
    watch = FolderWatch([tmp_path], recursive=False, settle=1.0, clock=clock)
    flags = EditFlags(PROMPTS[1], PROMPTS[3])
    _touch(tmp_path / "x.jpg", clock.now - 60)
    first = watched_items(watch.ready(), flags, targets=(), output=None, any_output=False)
    assert [(item.image.name, item.output.name) for item in first] == [("x.jpg", "x-edit.png")]
    known = [(tmp_path, tmp_path / "x.jpg")]
    _touch(tmp_path / "x.png", clock.now - 60)
    later = watched_items(watch.ready(), flags, targets=(), output=None, any_output=False, known=known)
    assert [(item.image.name, item.output.name, item.error) for item in later] == [("x.png", "x-png-edit.png", None)]
    known.append((tmp_path, tmp_path / "x.png"))
    _touch(tmp_path / "y.png", clock.now - 60)
    alone = watched_items(watch.ready(), flags, targets=(), output=None, any_output=False, known=known)
    assert [(item.image.name, item.output.name) for item in alone] == [("y.png", "y-edit.png")]


def test_watch_edits_what_is_there_then_what_arrives_until_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setattr(watch_module, "WATCH_INTERVAL", 0.2)
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    shutil.copy(EXAMPLES / "red-circle.png", source / "a.png")
    os.utime(source / "a.png", (time.time() - 60, time.time() - 60))
    happened: list[str] = []

    def arrive_then_stop() -> None:
        deadline = time.monotonic() + 120
        while not (out / "a-edit.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.copy(EXAMPLES / "green-square.png", source / "b.png")  # arrives while the model is loaded
        happened.append("copied")
        while not (out / "b-edit.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=arrive_then_stop, daemon=True)
    helper.start()
    result = CliRunner().invoke(main, ["edit", str(source), "--watch", *PROMPTS, "-o", str(out), "--json"])
    helper.join(timeout=5)
    assert result.exit_code == 130, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(Path(line.get("input", "")).name, line["status"]) for line in lines] == [
        ("a.png", "done"), ("b.png", "done"), ("", "summary")
    ]  # fmt: skip
    assert lines[-1]["done"] == 2
    assert "watching" in result.stderr and happened == ["copied"]
    assert read_record(out / "b-edit.png")["tgt"] == PROMPTS[3]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--spec", "rows.jsonl"], "not with --spec"),
        (["--jobs", "-"], "not with --jobs"),
        (["--shard", "0/2"], "not with --shard"),
        (["-o", "-"], "not with -o -"),
    ],
)
def test_watch_refuses_what_edits_another_way(tmp_path, extra, says):
    result = CliRunner().invoke(main, ["edit", str(tmp_path), "--watch", *PROMPTS, *extra])
    assert result.exit_code == 2 and says in result.output, result.output


def test_watch_watches_folders(tmp_path):
    photo = tmp_path / "a.png"
    shutil.copy(EXAMPLES / "red-circle.png", photo)
    for args, says in (([str(photo)], "is not one"), ([], "needs the folders")):
        result = CliRunner().invoke(main, ["edit", *args, "--watch", *PROMPTS])
        assert result.exit_code == 2 and says in result.output, result.output


def test_a_full_disk_ends_the_watch_with_exit_1(tmp_path, monkeypatch):
    import errno

    import icdcli.io.images

    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    shutil.copy(EXAMPLES / "red-circle.png", source / "a.png")
    os.utime(source / "a.png", (time.time() - 60, time.time() - 60))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "a-edit.png"))

    monkeypatch.setattr(icdcli.io.images, "save_image", full)
    result = CliRunner().invoke(main, ["edit", str(source), "--watch", *PROMPTS, "-o", str(out), "--json"])
    assert result.exit_code == 1, result.output
    assert "no space left" in result.stderr.lower() and "stopped watching" in result.stderr
    summary = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][-1]
    assert summary["status"] == "summary" and summary["failed"] == 1
