"""Batched edits, the persistent --jobs mode and scale-out with accelerate, on the embedded default model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.bench.scenes import edit_pairs
from icdcli.cli.common import load_model
from icdcli.cli.main import main
from icdcli.diffusion.recipe import P2POptions, SamplerSettings
from icdcli.editing.edits import EditJob, edit_batch
from icdcli.run.batch import default_batch_size, total_summary

MODEL_OPTIONS = {"model": None, "base": None, "teacher": None, "forward_lora": None, "reverse_lora": None,
                 "device": "cpu", "precision": None}  # fmt: skip
# 8-bit levels an item may move between a batch of one and a batch of several: float rounding of batched
# kernels, measured at most 1 on PyTorch and 0 on ONNX Runtime on the CPU
ROUNDING_LEVELS = 2


def _jobs(model, count, method):
    """Held-out scenes edited to a changed copy, each with its own guidance, tau and seed."""
    p2p = P2POptions().resolve(model.info.edit) if method == "p2p" else None
    jobs = []
    for index, (source, target, _) in enumerate(edit_pairs(count)[:count]):
        image = Image.fromarray(source.render(32))
        guidance, tau = 3.0 + index % 3, (0.6, 0.8)[index % 2]
        jobs.append(EditJob(image, source.caption(), target.caption(), guidance, tau, 7 + index, p2p))
    return jobs


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["swap", "p2p"])
def test_an_item_gives_the_same_result_alone_and_in_a_batch(backend, method):
    model = load_model(MODEL_OPTIONS, need_teacher=False, backend=backend).model
    jobs = _jobs(model, 5, method)
    settings = SamplerSettings("icd", 50, 0)
    alone = [edit_batch(model, [job], settings=settings)[0] for job in jobs]
    together = edit_batch(model, jobs, settings=settings)
    for one, batched in zip(alone, together, strict=True):
        difference = np.abs(np.asarray(one, dtype=int) - np.asarray(batched, dtype=int)).max()
        assert difference <= ROUNDING_LEVELS
    # and the batch's items are each their own edit: another seed gives another result
    reseeded = edit_batch(model, [replace(jobs[0], seed=99), *jobs[1:]], settings=settings)
    assert np.abs(np.asarray(reseeded[0], dtype=int) - np.asarray(together[0], dtype=int)).max() > ROUNDING_LEVELS
    for before, after in zip(together[1:], reseeded[1:], strict=True):
        assert np.abs(np.asarray(before, dtype=int) - np.asarray(after, dtype=int)).max() <= ROUNDING_LEVELS


def test_a_p2p_item_that_cannot_run_fails_alone():
    model = load_model(MODEL_OPTIONS, need_teacher=False, backend="torch").model
    jobs = _jobs(model, 3, "p2p")
    broken = replace(jobs[1], p2p=replace(jobs[1].p2p, blend_source=("unicorn",)))
    results = edit_batch(model, [jobs[0], broken, jobs[2]], settings=SamplerSettings("icd", 50, 0))
    assert isinstance(results[1], ValueError) and "unicorn" in str(results[1])
    assert all(isinstance(result, Image.Image) for result in (results[0], results[2]))


def test_default_batch_sizes_and_the_total_of_shards():
    assert default_batch_size("cpu", 32 * 32) == 64
    assert default_batch_size("cpu", 512 * 512) == 1
    assert default_batch_size("cuda", 512 * 512) == 16 and default_batch_size("cuda", 1024 * 1024) == 4
    parts = [
        {"done": 3, "skipped": 1, "failed": 0, "seconds": 2.0},
        {"done": 5, "skipped": 0, "failed": 1, "seconds": 4.0},
    ]
    total = total_summary(parts)
    assert (total["done"], total["skipped"], total["failed"], total["images_per_second"]) == (8, 1, 1, 2.0)


def _scenes(folder: Path, count: int) -> list[tuple[str, str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (source, target, _) in enumerate(edit_pairs(count)[:count]):
        Image.fromarray(source.render(32)).save(folder / f"s{index}.png")
        rows.append((f"s{index}.png", source.caption(), target.caption()))
    return rows


def test_the_first_full_group_is_read_while_the_first_item_runs_alone():
    """The first item runs alone (its result comes at once); the items of the next two groups are read meanwhile,
    so the networks do not then wait for a whole batch of files. Groups fill to their limit, results keep order."""
    import threading

    from icdcli.run.flow import BatchPipeline, Prepared

    read, lock, next_group_read = [], threading.Lock(), threading.Event()

    def prepare(item):
        with lock:
            read.append(item)
            if len(read) >= 1 + 2 * 4:  # two groups ahead, as after any later group
                next_group_read.set()
        return Prepared(item, item)

    groups, read_while_first_ran = [], []

    def run_group(group):
        if not groups:
            read_while_first_ran.append(next_group_read.wait(10))
        groups.append([prepared.item for prepared in group])
        return [prepared.item * 10 for prepared in group]

    outcomes = []
    pipeline = BatchPipeline(
        prepare=prepare, group_key=lambda prepared: 0, batch_limit=lambda prepared: 4, run_group=run_group,
        write=lambda prepared, result: result, report=lambda item, outcome: outcomes.append(outcome) or True,
    )  # fmt: skip
    assert pipeline.run(range(10))
    assert read_while_first_ran == [True]
    assert groups == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert outcomes == [item * 10 for item in range(10)]


def test_a_failure_reported_only_after_the_last_write_still_stops_the_run():
    """The last group's writes are reported in the final drain: a report there that says stop makes `run` say so."""
    import time

    from icdcli.run.flow import BatchPipeline, ItemError, Prepared

    def write(prepared, result):
        time.sleep(0.3)  # still writing when the loop ends: reported in the drain
        raise OSError(28, "No space left on device")

    outcomes = []
    pipeline = BatchPipeline(
        prepare=lambda item: Prepared(item, item), group_key=lambda prepared: 0, batch_limit=lambda prepared: 4,
        run_group=lambda group: [prepared.item for prepared in group], write=write,
        report=lambda item, outcome: outcomes.append(outcome) or not isinstance(outcome, ItemError),
    )  # fmt: skip
    assert not pipeline.run([0])
    assert pipeline.halted and len(outcomes) == 1 and isinstance(outcomes[0], ItemError)


@pytest.mark.slow
def test_a_folder_in_batches_matches_one_at_a_time(tmp_path):
    rows = _scenes(tmp_path / "in", 6)
    prompts = ["--src", rows[0][1], "--tgt", rows[0][2]]
    runs = {}
    for size in ("1", "4"):
        out = tmp_path / f"out{size}"
        result = CliRunner().invoke(main, ["edit", str(tmp_path / "in"), "-o", str(out), *prompts, "--json",
                                           "--batch-size", size])  # fmt: skip
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["input"] for line in lines[:-1]] == [str(tmp_path / "in" / name) for name, _, _ in rows]
        runs[size] = [np.asarray(Image.open(out / f"s{i}-edit.png"), dtype=int) for i in range(6)]
    for one, batched in zip(runs["1"], runs["4"], strict=True):
        assert np.abs(one - batched).max() <= ROUNDING_LEVELS


@pytest.mark.slow
def test_jobs_from_stdin_one_result_line_each_and_bad_lines_do_not_stop(tmp_path, monkeypatch):
    rows = _scenes(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    lines = [
        json.dumps({"image": rows[0][0], "src": rows[0][1], "tgt": rows[0][2], "output": "first.png"}),
        "{not json",
        json.dumps({"image": "missing.png", "src": "a", "tgt": "b"}),
        json.dumps({"image": rows[1][0], "src": rows[1][1], "tgt": rows[1][2], "seed": 4, "colour": "red"}),
        json.dumps({"image": rows[1][0], "src": rows[1][1], "tgt": rows[1][2], "seed": 4}),
    ]
    result = CliRunner().invoke(main, ["edit", "--jobs", "-"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["status"] for line in out] == ["done", "failed", "failed", "failed", "done"]
    assert "not a JSON object" in out[1]["error"] and "unknown field 'colour'" in out[3]["error"]
    assert (tmp_path / "first.png").is_file() and (tmp_path / "s1-edit.png").is_file()
    assert out[4]["seed"] == 4
    again = CliRunner().invoke(main, ["edit", "--jobs", "-"], input=lines[0] + "\n")
    assert [json.loads(line)["status"] for line in again.stdout.splitlines()] == ["skipped"]
    nulls = CliRunner().invoke(main, ["edit", "--jobs", "-", "--overwrite"], input=f"null\n{lines[0]}\nnull\n")
    assert nulls.exit_code == 0 and "Traceback" not in nulls.output, nulls.output
    results = [json.loads(line) for line in nulls.stdout.splitlines()]  # JSON null is a bad line, not the last job
    assert [(line["status"], line["item"] if line["status"] == "failed" else line["output"]) for line in results] == [
        ("failed", "-:1"),
        ("done", "first.png"),
        ("failed", "-:3"),
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate's launcher is not installed")  # fmt: skip
@pytest.mark.slow
def test_accelerate_launch_splits_a_folder_over_two_processes(tmp_path):
    rows = _scenes(tmp_path / "in", 6)
    out = tmp_path / "out"
    launcher = str(Path(sys.executable).with_name("accelerate"))
    # --multi_gpu launches N processes through torchrun, also without a GPU (--cpu would run one process)
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "icdcli", "edit", str(tmp_path / "in"), "-o", str(out), "--src", rows[0][1], "--tgt", rows[0][2],
               "--shard", "auto", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    done = [line["output"] for line in lines if line["status"] == "done"]
    assert sorted(done) == sorted(str(out / f"s{i}-edit.png") for i in range(6))  # each once, none twice
    summaries = [line for line in lines if line["status"] == "summary"]
    totals = [line for line in lines if line["status"] == "total"]
    assert len(summaries) == 2 and sum(summary["done"] for summary in summaries) == 6
    assert len(totals) == 1 and totals[0]["done"] == 6 and totals[0]["processes"] == 2
    assert "total over 2 processes: 6 done" in first.stderr
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    rerun = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert [line for line in rerun if line["status"] == "total"][0]["skipped"] == 6
    assert not any(line["status"] == "done" for line in rerun)


def _bench_throughput(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", "throughput", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_bench_throughput_times_batch_1_against_a_larger_batch_over_the_same_edits():
    report = _bench_throughput("--images", "3", "--batch-size", "2", "--backend", "torch")
    assert (report["arch"], report["size"], report["images"], report["backend"]) == ("shapes32", 32, 3, "torch")
    assert [row["batch_size"] for row in report["rows"]] == [1, 2]
    assert all(row["images"] == 3 and row["failed"] == 0 and row["images_per_second"] > 0 for row in report["rows"])
    assert report["load_seconds"] > 0


@pytest.mark.slow
def test_bench_throughput_repeats_reports_the_median_of_runs_taken_in_turns():
    from icdcli.bench.throughput import median_row

    report = _bench_throughput("--images", "2", "--batch-size", "2", "--backend", "torch", "--repeats", "3")
    for row in report["rows"]:
        assert len(row["runs"]) == 3 and all(rate > 0 for rate in row["runs"])
        assert row["images_per_second"] == sorted(row["runs"])[1] and row["images"] == 2
    runs = [{"images_per_second": rate, "seconds": 10 / rate} for rate in (4.0, 1.0, 3.0, 2.0)]
    assert median_row(runs) == {"images_per_second": 2.5, "seconds": 10 / 3.0, "runs": [4.0, 1.0, 3.0, 2.0]}
    assert median_row(runs[:1]) == runs[0]


@pytest.mark.slow
def test_bench_throughput_sd15_runs_the_real_architecture_through_the_users_flags(tmp_path, monkeypatch):
    """At shrunk width and 64 px: the scale files written into the cache, loaded as --base/--teacher/--forward-lora/
    --reverse-lora, two P2P edits of 64 px photos at batch 1 and at 4."""
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    args = ["--arch", "sd15", "--width-scale", "0.05", "--size", "64", "--images", "2", "--backend", "torch"]
    report = _bench_throughput(*args)
    assert (report["arch"], report["size"], report["width_scale"], report["images"]) == ("sd15", 64, 0.05, 2)
    assert [row["batch_size"] for row in report["rows"]] == [1, 4]
    assert all(row["images"] == 2 and row["failed"] == 0 and row["images_per_second"] > 0 for row in report["rows"])
    assert report["load_seconds"] > 0 and report["files_seconds"] > 0
    assert (tmp_path / "scale" / "sd15-w0.05" / "scale.json").is_file()
    assert any((tmp_path / "merged").iterdir()), "fused through the LoRA files' path, into the fused-model cache"
    from icdcli.bench.scale_models import scale_files

    assert scale_files("sd15", 0.05)[1] is None, "the files are written once, then reused"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--arch", "sd15", "--model", "shapes32"], "leave out --model"),
        (["--arch", "sd15", "--size", "100"], "multiples of 64"),
        (["--width-scale", "0.5"], "for --arch sd15"),
    ],
)
def test_bench_throughput_refuses_what_its_arch_cannot_use(args, says):
    result = CliRunner().invoke(main, ["bench", "throughput", *args])
    assert result.exit_code == 1 and says in result.output


def test_the_sd15_spec_gives_each_photo_its_own_word_for_word_edit(tmp_path):
    from icdcli.bench.throughput import write_photo_spec
    from icdcli.run.batch import read_spec

    rows = read_spec(write_photo_spec(tmp_path, 30, 128))
    assert len(rows) == 30 and len({row.seed for row in rows}) == 30
    assert len({(row.src, row.tgt) for row in rows[:24]}) == 24
    for row in rows:
        source, target = row.src.split(), row.tgt.split()
        assert len(source) == len(target) and sum(a != b for a, b in zip(source, target, strict=True)) == 1
        assert Image.open(row.image).size == (128, 128)
