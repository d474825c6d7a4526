"""A full disk, whatever words the writer used for it (an OSError, safetensors' error, torch.save's), ends a command
with one line that names the path and says to free space, never a traceback; the file or folder being replaced is
kept, nothing half-written stays; an edit whose automatic backend cannot export runs on PyTorch instead."""

from __future__ import annotations

import errno
import importlib.util
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

from icdcli.cli.main import main
from icdcli.core.errors import no_space_error, space_errno
from icdcli.io.atomic import atomic_folder, atomic_path

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SRC = "a red circle on a blue background"
TGT = "a yellow circle on a blue background"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_SAVE_FAILED = (
    "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
)


def _chained(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            raise outer  # noqa: B904 (the implicit chain is what is tested)
    except BaseException as error:
        return error


def test_space_errno_reads_each_writers_words():
    assert space_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert space_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    assert space_errno(SafetensorError(SAFETENSORS_FULL)) == errno.ENOSPC
    assert space_errno(RuntimeError("failed: Disk quota exceeded")) == errno.EDQUOT
    assert space_errno(_chained(OSError(errno.ENOSPC, "full"), RuntimeError("export failed"))) == errno.ENOSPC
    assert space_errno(OSError(errno.EACCES, "Permission denied")) is None
    assert space_errno(ValueError("no image")) is None


def test_an_error_raised_from_none_does_not_count_the_one_it_replaced():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("handled: something else went wrong") from None
    except ValueError as error:
        assert space_errno(error) is None


def test_torch_saves_bare_write_failure_counts_only_where_the_disk_is_nearly_full(tmp_path, monkeypatch):
    error = RuntimeError(TORCH_SAVE_FAILED)
    assert space_errno(error) is None  # no place to look at
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100 * 2**30))
    assert space_errno(error, tmp_path / "checkpoints" / "step-10") is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    assert space_errno(error, tmp_path / "checkpoints" / "step-10") == errno.ENOSPC  # a folder not made yet
    full = no_space_error(error, tmp_path / "out.pt")
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC and full.filename == str(tmp_path / "out.pt")


def test_atomic_writes_name_the_target_and_keep_what_was_there(tmp_path):
    target = tmp_path / "latents.safetensors"
    target.write_bytes(b"the user's file")
    with pytest.raises(OSError) as raised, atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise SafetensorError(SAFETENSORS_FULL)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_bytes() == b"the user's file" and sorted(tmp_path.iterdir()) == [target]

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(OSError) as raised, atomic_folder(folder) as staging:
        (staging / "graph.onnx").write_bytes(b"half")
        raise RuntimeError("onnx save failed") from OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    assert sorted(tmp_path.iterdir()) == [folder, target]  # no staging folder left


def test_other_errors_pass_through_the_atomic_writes_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not about space"), atomic_path(tmp_path / "x.png"):
        raise ValueError("not about space")
    assert list(tmp_path.iterdir()) == []


def test_invert_onto_a_full_disk_says_so_in_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import icdcli.editing.inversion

    def full(inversion, path, record=None):  # safetensors' own error, half a file written
        Path(path).write_bytes(b"half")
        raise SafetensorError(SAFETENSORS_FULL)

    # patched where the command calls it: patching safetensors itself leaked into modules first imported meanwhile
    monkeypatch.setattr(icdcli.editing.inversion, "save_inversion", full)
    out = tmp_path / "cat.latent.safetensors"
    out.write_bytes(b"an earlier inversion")
    result = CliRunner().invoke(main, ["invert", str(EXAMPLE), "--prompt", SRC, "-o", str(out), "--overwrite"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert lines == [f"Error: {out}: no space left on the device; free space, or write to another disk, and run again"]
    assert out.read_bytes() == b"an earlier inversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def _export_finds_no_space(monkeypatch):
    import icdcli.export

    def full(model, folder, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(icdcli.export, "export_model", full)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_an_automatic_backend_that_cannot_export_runs_the_edit_on_pytorch(tmp_path, monkeypatch):
    from icdcli.backends.accelerated import select_run

    if select_run("auto", "auto", device=__import__("torch").device("cpu"), sd_size=False).backend != "onnxruntime":
        pytest.skip("auto does not choose ONNX Runtime for the embedded model here")
    _export_finds_no_space(monkeypatch)
    monkeypatch.setenv("ICD_BACKEND", "auto")
    out = tmp_path / "edit.png"
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(out), "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "note: backend torch instead of onnxruntime: exporting to " in result.stderr
    assert ": no space left on the device; free space (icd cache prune --max-size SIZE)" in result.stderr
    assert '"backend": "torch"' in result.stdout and out.is_file()


def test_a_backend_asked_for_by_name_that_cannot_export_fails_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    _export_finds_no_space(monkeypatch)
    out = tmp_path / "edit.png"
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(out), "--backend", "onnxruntime"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and not out.exists(), result.output
    assert "the model cannot be loaded: no space left on the device (" in result.stderr
    assert "--backend torch" in result.stderr and "Traceback" not in result.output


class _FakeAccelerator:
    is_main_process = True
    num_processes = 1

    def __init__(self, error: BaseException):
        self.error = error

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"half a checkpoint")
        raise self.error


def test_a_checkpoint_that_meets_a_full_disk_leaves_nothing_half_written(tmp_path):
    from icdcli.training.checkpoints import Checkpointer, list_checkpoints

    stage = tmp_path / "teacher"
    saver = Checkpointer(_FakeAccelerator(SafetensorError(SAFETENSORS_FULL)), stage, every=10, kept=2)
    with pytest.raises(OSError) as raised:
        saver.save(20)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(stage / "checkpoints")
    assert list((stage / "checkpoints").iterdir()) == [] and list_checkpoints(stage) == []

    other = Checkpointer(_FakeAccelerator(ValueError("a bug")), stage, every=10, kept=2)
    with pytest.raises(ValueError, match="a bug"):
        other.save(30)
    assert list((stage / "checkpoints").iterdir()) == []


def test_train_on_a_full_disk_says_how_to_continue(tmp_path, monkeypatch):
    import icdcli.cli.train

    where = tmp_path / "run" / "vae" / "checkpoints"

    def full(request):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(icdcli.cli.train, "_train", full)
    result = CliRunner().invoke(main, ["train", "--smoke", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: no space left on the device ({where}): finished stages and saved checkpoints are kept; free space "
        f"and run icd train {tmp_path / 'run'} --smoke to continue"
    )


def test_an_export_that_would_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import icdcli.core.paths

    monkeypatch.setattr(icdcli.core.paths, "free_bytes", lambda where: 5 * 2**20)  # 5 MB: the export takes ~120
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--out", str(out)])
    assert result.exit_code == 1 and not out.exists(), result.output
    assert "exporting forward_unet" not in result.output  # refused before any tracing
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith(f"Error: {out}: the ONNX export needs about ") and " MB and its disk has 5.0 MB free; " in (
        line
    )

    edit = tmp_path / "edit.png"
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(edit), "--backend", "onnxruntime"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "the model cannot be loaded: the ONNX export needs about" in refused.stderr


def test_the_export_estimate_covers_what_an_export_writes(tmp_path):
    from icdcli.export.onnx import estimated_bytes, export_model
    from icdcli.models.sources import ModelRequest, load_requested_model

    model = load_requested_model(ModelRequest(None, None, None, None, None))
    estimate = estimated_bytes(model, "fp32", include_teacher=True)
    folder = export_model(model, tmp_path / "export", precision="fp32")
    written = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert written < estimate < 2 * written  # the graphs, plus the working copies of the largest
