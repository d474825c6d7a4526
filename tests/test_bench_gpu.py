"""`icd bench gpu` on the CPU at reduced width: every field of the report, the GPU-only rows skipped with their
reasons, strict JSON, and a report file that is whole after every step - also when the time limit, an interrupt
or a crash ends the run early. Timings are printed by the bench, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from icdcli.bench import gpu as bench_gpu_module
from icdcli.bench.gpu import bench_gpu
from icdcli.bench.gpu_report import NOT_REACHED, STARTED, GpuOptions
from icdcli.cli.main import main

SMALL = ["--device", "cpu", "--width-scale", "0.125", "--size", "128", "--repeats", "1", "--eval-repeats", "1"]


def strict(text: str) -> Any:
    """JSON that any parser reads: NaN and Infinity refused."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _options(out: Path, **changes: Any) -> GpuOptions:
    values: dict[str, Any] = dict(device="cpu", width=0.125, size=128, repeats=1, eval_repeats=1, out=out)
    return GpuOptions(**{**values, **changes})


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """A machine where torch sees a GPU, whose every use fails the test: --device cpu must never touch it."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("icd bench gpu --device cpu used CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated", "memory_allocated",
                 "get_device_properties", "empty_cache", "get_device_name"):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, forbidden)


@pytest.mark.slow
def test_cpu_run_reports_every_field_and_skips_gpu_rows_with_reasons(tmp_path, no_cuda_calls):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(main, ["bench", "gpu", *SMALL, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = strict(result.stdout)
    assert strict(out.read_text()) == report  # the file holds the final report
    assert report["device"] == "cpu" and report["finished"] is True and report["current_step"] is None
    assert {"torch", "cuda", "diffusers", "python", "driver"} <= report["versions"].keys()
    assert report["versions"]["diffusers"] is not None
    assert {entry["status"] for entry in report["backends"].values()} == {"absent"}
    build = report["builds"]["sd15"]
    assert build["status"] == "ran" and build["guidance_dim"] == 512 and build["reverse"] == [259, 519, 779, 999]
    rows = report["rows"]
    assert {(row["mode"], row["method"], row["batch"]) for row in rows} == {
        (mode, method, batch)
        for mode in ("eager", "graphs", "compile")
        for method, batch in (("eval", 1), ("eval", 2), ("swap", 1), ("p2p", 1))
    }
    for row in rows:
        assert {"arch", "mode", "method", "batch", "status", "reason", "seconds", "peak_memory_gb"} <= row.keys()
        assert row["arch"] == "sd15" and row["size"] == 128 and row["peak_memory_gb"] is None
        if row["mode"] == "eager":
            assert row["status"] == "ran", row
            assert row["reason"] is None and isinstance(row["seconds"], float) and row["repeats"] == 1
        else:
            assert row["status"] == "skipped" and "CUDA" in row["reason"] and row["seconds"] is None
    edits = [row for row in rows if row["mode"] == "eager" and row["method"] != "eval"]
    assert all({"encode", "decode"} <= row["stages"].keys() for row in edits)
    assert all(row["unet_evaluations"] == 8 for row in edits)
    for kind in ("eval", "edit_pixels"):
        (entry,) = report["parity"][kind]
        assert entry["status"] == "skipped" and "--device cuda" in entry["reason"]


@pytest.mark.slow
def test_readable_table_without_json(tmp_path):
    result = CliRunner().invoke(main, ["bench", "gpu", *SMALL, "--mode", "eager", "--mode", "graphs", "--no-parity"])
    assert result.exit_code == 0, result.output
    assert "| sd15 | eager | swap | 1 | 128 | ran |" in result.stdout
    assert "| sd15 | graphs | p2p | 1 | 128 | skipped [" in result.stdout
    assert "compile" not in result.stdout.split("[1]")[0]  # only the modes asked for
    assert "CUDA graphs need a CUDA device" in result.stdout


def test_unknown_device_and_bad_size_are_one_line_errors():
    for args, words in ((["--device", "tpu"], "unknown device"), (["--size", "100"], "multiple of 64")):
        small = [a for a in SMALL if a not in ("--size", "128")] if "--size" in args else SMALL
        result = CliRunner().invoke(main, ["bench", "gpu", *small, *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert words in result.output, result.output


def _recording_writes(monkeypatch) -> list[dict[str, Any]]:
    """Every report the bench writes, read back from the file right after the write."""
    snapshots: list[dict[str, Any]] = []
    write = bench_gpu_module.write_report

    def recording(report: dict[str, Any], out: Path) -> None:
        write(report, out)
        snapshots.append(strict(out.read_text()))

    monkeypatch.setattr(bench_gpu_module, "write_report", recording)
    return snapshots


@pytest.mark.slow
def test_time_limit_skips_the_rest_and_every_step_rewrites_the_file(tmp_path, monkeypatch):
    snapshots = _recording_writes(monkeypatch)
    now = [0.0]

    def progress(message: str) -> None:  # the clock jumps past the limit once the second evaluation row is done
        if message.startswith("sd15 eager eval batch 2:"):
            now[0] = 100.0

    out = tmp_path / "gpu.json"
    report = bench_gpu(_options(out, time_limit=50.0), progress, clock=lambda: now[0], interrupt=False)
    assert strict(out.read_text()) == strict(json.dumps(report))
    status = {(row["mode"], row["method"], row["batch"]): (row["status"], row["reason"]) for row in report["rows"]}
    assert status["eager", "eval", 1][0] == status["eager", "eval", 2][0] == "ran"
    for method in ("swap", "p2p"):
        state, reason = status["eager", method, 1]
        assert state == "skipped" and reason.startswith("time limit: 100 s of --time-limit 50 s used"), reason
    assert all(reason for state, reason in status.values() if state == "skipped")
    assert report["finished"] is True
    # written before anything ran, then before and after each step; the rows that ran only ever grow
    assert all(row["reason"] == NOT_REACHED for row in snapshots[0]["rows"]) and snapshots[0]["versions"]
    assert len(snapshots) >= 8
    ran = [sum(row["status"] == "ran" for row in snapshot["rows"]) for snapshot in snapshots]
    assert ran == sorted(ran) and ran[-1] == 2


@pytest.mark.slow
def test_a_run_killed_mid_step_leaves_the_rows_it_finished(tmp_path):
    def progress(message: str) -> None:  # stands for a kill (or crash) while the swap edit runs
        if message == "sd15 eager swap ...":
            raise KeyboardInterrupt

    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        bench_gpu(_options(out), progress)
    report = strict(out.read_text())
    assert report["finished"] is False and report["current_step"] == "sd15 eager swap"
    rows = {(row["mode"], row["method"], row["batch"]): row for row in report["rows"]}
    assert rows["eager", "eval", 1]["status"] == rows["eager", "eval", 2]["status"] == "ran"
    assert rows["eager", "swap", 1]["status"] == "skipped" and rows["eager", "swap", 1]["reason"] == STARTED
    assert rows["eager", "p2p", 1]["reason"] == NOT_REACHED


@pytest.mark.slow
def test_the_time_limit_interrupts_a_step_that_runs_past_it(tmp_path):
    now = [0.0]

    def progress(message: str) -> None:  # the swap edit starts 20 ms before the limit and takes longer than that
        if message == "sd15 eager swap ...":
            now[0] = 50.0 - 0.02

    report = bench_gpu(_options(tmp_path / "gpu.json", time_limit=50.0), progress, clock=lambda: now[0])
    rows = {(row["mode"], row["method"]): row for row in report["rows"]}
    assert rows["eager", "swap"]["status"] == "skipped"
    assert rows["eager", "swap"]["reason"] == "time limit: --time-limit 50 s ran out during this step"
    assert rows["eager", "p2p"]["status"] == "skipped" and rows["eager", "p2p"]["reason"].startswith("time limit")
    assert rows["eager", "eval"]["status"] == "ran" and report["finished"] is True


@pytest.mark.slow
def test_parity_of_a_model_with_its_own_fp32_copy_is_exact():
    """The parity path (the CPU twin kept at build, one evaluation, one whole edit) finds no difference where
    there is none: same weights, device and dtype."""
    from icdcli.bench.gpu_models import build_model
    from icdcli.bench.gpu_steps import parity_edit, parity_eval
    from icdcli.bench.scale_models import scale_tokenizer

    built = build_model("sd15", width=0.125, size=128, device=torch.device("cpu"), dtype=torch.float32, seed=1,
                        reference=True, tokenizer=scale_tokenizer())  # fmt: skip
    assert built.reference is not None and built.reference.reverse_unet is not built.model.reverse_unet
    evaluation = parity_eval(built, seed=0)
    assert evaluation["max_abs"] == evaluation["mean_abs"] == 0.0 and evaluation["reference_max_abs"] > 0
    edit = parity_edit(built)
    assert edit["method"] == "p2p" and edit["max_abs_255"] == edit["mean_abs_255"] == 0.0


def test_execution_modes_come_from_torch_speed_when_it_is_there(monkeypatch):
    import sys
    import types

    from icdcli.bench.gpu_models import NO_MODES, set_mode

    class Model:
        def __init__(self) -> None:
            self.modes: list[str] = []

        def set_execution(self, execution: Any) -> Model:
            self.modes.append(execution)
            return self

    speed = types.ModuleType("icdcli.models.torch_speed")
    speed.TorchExecution = types.SimpleNamespace(from_mode=lambda mode: f"execution {mode}")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "icdcli.models.torch_speed", speed)
    model = Model()
    assert set_mode(model, "graphs") is None and set_mode(model, "eager") is None
    assert model.modes == ["execution graphs", "execution eager"]
    assert set_mode(object(), "compile") == NO_MODES and set_mode(object(), "eager") is None
    monkeypatch.setitem(sys.modules, "icdcli.models.torch_speed", None)  # a build without the module
    assert set_mode(model, "compile") == NO_MODES


@pytest.mark.slow
def test_graph_mode_rows_run_and_a_p2p_row_gives_the_attention_back():
    """The rows' measuring under CUDA-graph bookkeeping (replayed eagerly off CUDA: `anywhere`), and the reverse
    UNet's own attention processors back after a P2P row, so the next mode's rows run what the first ones ran."""
    from icdcli.bench.gpu_machine import Budget, Clocked
    from icdcli.bench.gpu_models import build_model, default_attention
    from icdcli.bench.gpu_steps import measure_edit, measure_eval
    from icdcli.bench.scale_models import scale_tokenizer
    from icdcli.diffusion.p2p.attention import has_p2p_processors
    from icdcli.models.torch_speed import TorchExecution

    built = build_model("sd15", width=0.125, size=128, device=torch.device("cpu"), dtype=torch.float32, seed=2,
                        reference=False, tokenizer=scale_tokenizer())  # fmt: skip
    model = built.model.set_execution(TorchExecution.from_mode("graphs"), anywhere=True)
    clock = Clocked(torch.device("cpu"))
    processors = {name: type(p) for name, p in model.reverse_unet.attn_processors.items()}
    assert measure_eval(model, 2, clock, repeats=1, seed=0)["repeats"] == 1
    with default_attention(model.reverse_unet):
        row = measure_edit(model, "p2p", clock, 2, Budget(100.0, interrupt=False))
        assert has_p2p_processors(model.reverse_unet)
    assert row["repeats"] == 2 and {"encode", "decode"} <= row["stages"].keys() and row["unet_evaluations"] == 8
    assert not has_p2p_processors(model.reverse_unet)
    assert {name: type(p) for name, p in model.reverse_unet.attn_processors.items()} == processors
    assert model.execution_notes == []  # no capture fell back
