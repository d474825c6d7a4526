"""Batch editing: inputs, spec files, outputs, shards, resume, --from, Ctrl-C and hostile inputs."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.run.batch import (
    Item,
    Shard,
    decide,
    expand_inputs,
    parse_shard,
    read_spec,
    select_shard,
    shard_of,
    with_prompts,
)
from icdcli.run.planning import plan_items

PROMPTS = ["--src", "a cat", "--tgt", "a dog"]


def _photo(path, width=40, height=24, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _strict(text):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _lines(result):
    return [_strict(line) for line in result.stdout.strip().splitlines()]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- pure logic ---------------------------------------------------------------------------------


def test_folders_give_their_image_files_and_mirror_their_layout(tmp_path):
    for name in ("a.png", "b.JPG", "notes.txt", ".hidden.png", "sub/a.png", "sub/deep/c.webp", ".git/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    flat, any_folder = expand_inputs([tmp_path], recursive=False)
    assert any_folder and [i.relative.as_posix() for i in flat] == ["a.png", "b.JPG"]
    deep, _ = expand_inputs([tmp_path], recursive=True)
    assert [i.relative.as_posix() for i in deep] == ["a.png", "b.JPG", "sub/a.png", "sub/deep/c.webp"]
    items = plan_items([with_prompts(i, "s", "t") for i in deep], tmp_path / "out")
    outputs = [i.output.relative_to(tmp_path / "out").as_posix() for i in items]
    assert outputs == ["a-edit.png", "b-edit.png", "sub/a-edit.png", "sub/deep/c-edit.png"]
    named, any_folder = expand_inputs([tmp_path / "notes.txt"], recursive=False)  # named files are taken as given
    assert not any_folder and named[0].image == tmp_path / "notes.txt"


def test_spec_rows_resolve_against_the_spec_and_bad_rows_fail_alone(tmp_path):
    spec = tmp_path / "specs" / "edits.jsonl"
    spec.parent.mkdir()
    rows = [
        '{"image": "pics/a.png", "src": "a cat", "tgt": "a dog", "guidance": 3, "tau": 0.5, "seed": 4}',
        "",
        "# a comment",
        "{not json",
        '{"src": "a cat", "tgt": "a dog"}',
        '{"image": "b.png", "guidance": "lots"}',
        '{"image": "b.png", "tau": 2}',
        '{"image": "b.png", "colour": "red"}',
        '["b.png"]',
        '{"image": "/abs/c.png", "output": "c-out.png"}',
    ]
    spec.write_text("\n".join(rows))
    items = [with_prompts(item, "s", "t") for item in read_spec(spec)]
    assert [item.row for item in items] == [1, 4, 5, 6, 7, 8, 9, 10]
    good = items[0]
    assert good.image == spec.parent / "pics" / "a.png" and good.relative.as_posix() == "pics/a.png"
    assert (good.src, good.tgt, good.guidance, good.tau, good.seed) == ("a cat", "a dog", 3.0, 0.5, 4)
    errors = [item.error for item in items[1:-1]]
    for error, expected in zip(errors, ["Expecting", "no image", "guidance must be", "tau must be", "unknown field",
                                        "must be an object"], strict=True):  # fmt: skip
        assert error.startswith(f"{spec}:") and expected in error
    assert items[-1].image == Path("/abs/c.png") and (items[-1].src, items[-1].tgt) == ("s", "t")
    assert with_prompts(read_spec(spec)[0].__class__("x", "x", image=Path("x.png")), None, "t").error.endswith(
        "give --src"
    )


def test_csv_spec_and_its_header(tmp_path):
    spec = tmp_path / "edits.csv"
    spec.write_text("image,src,tgt,seed\na.png,a cat,a dog,3\nb.png,,,x\nc.png,a,b,1,extra\n")
    items = read_spec(spec)
    assert (items[0].image, items[0].seed) == (tmp_path / "a.png", 3)
    assert "seed must be an integer" in items[1].error and "more cells" in items[2].error
    spec.write_text("picture,src\nx.png,a\n")
    with pytest.raises(ValueError, match="must name the columns"):
        read_spec(spec)
    with pytest.raises(ValueError, match="no such file"):
        read_spec(tmp_path / "absent.csv")


def test_one_image_many_rows_get_row_numbers_and_clashes_fail(tmp_path):
    spec = tmp_path / "edits.jsonl"
    spec.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"image": "a.png", "tgt": "a dog"},
                {"image": "a.png", "tgt": "a fox"},
                {"image": "b.png", "output": "same.png"},
                {"image": "c.png", "output": "same.png"},
                {"image": "d.png", "output": "a.png"},
            ]
        )
    )
    items = plan_items([with_prompts(i, "s", "t") for i in read_spec(spec)], None, spec_out=tmp_path)
    assert [i.output.name for i in items[:3]] == ["a-edit-1.png", "a-edit-2.png", "same.png"]
    assert "also the output of" in items[3].error and "is an input" in items[4].error
    files, _ = expand_inputs([tmp_path / "photo.jpg", tmp_path / "photo.png", tmp_path / "other.png"], recursive=False)
    names = [item.output.name for item in plan_items([with_prompts(i, "s", "t") for i in files], tmp_path / "o")]
    assert names == ["photo-jpg-edit.png", "photo-png-edit.png", "other-edit.png"]


def test_shards_cover_every_item_exactly_once():
    items = [Item(f"p{i}", f"/photos/p{i}.png") for i in range(200)]
    for count in (1, 2, 3, 7):
        chosen = [item.key for index in range(count) for item in select_shard(items, index, count)]
        assert sorted(chosen) == sorted(item.key for item in items)
    assert shard_of("/photos/p1.png", 7) == shard_of("/photos/p1.png", 7)
    sizes = [len(select_shard(items, index, 4)) for index in range(4)]
    assert min(sizes) > 30  # a hash spreads items about evenly
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard("auto", environ={"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2, True)
    assert parse_shard("auto", environ={}) == Shard(0, 1, True)
    for bad in ("5/5", "-1/3", "1", "a/b"):
        with pytest.raises(ValueError, match=f"'{bad}': .* e.g. 0/4"):
            parse_shard(bad)


def test_resume_decisions():
    wanted = {"model_hash": "h", "method": "swap", "sampler": "icd", "steps": 4, "src": "a", "tgt": "b",
              "guidance": 19.0, "tau": 0.8, "seed": 0, "input_sha256": "x", "backend": "torch"}  # fmt: skip
    assert decide(False, None, wanted, overwrite=False).action == "run"
    assert decide(True, {**wanted, "backend": "onnxruntime"}, wanted, overwrite=False).action == "skip"
    refused = decide(True, {**wanted, "seed": 3}, wanted, overwrite=False)
    assert refused.action == "refuse" and "seed 3 -> 0" in refused.reason and "--overwrite" in refused.reason
    assert decide(True, None, wanted, overwrite=False).action == "refuse"
    assert decide(True, {**wanted, "seed": 3}, wanted, overwrite=True).action == "run"


# --- the command on real files ----------------------------------------------------------------


@pytest.mark.slow
def test_folder_batch_mirrors_layout_resumes_and_summarises(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index, name in enumerate(["a.png", "b.jpg", "sub/a.png"]):
        _photo(photos / name, 32 + 8 * index, 24, seed=index)
    (photos / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["edit", photos, "-r", "-o", out, *PROMPTS, "--model", merged_dir, "--json"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    lines = _lines(first)
    assert [line["status"] for line in lines] == ["done", "done", "done", "summary"]
    assert {"done", "skipped", "failed", "seconds", "images_per_second"} <= lines[-1].keys()
    assert _files(out) == ["a-edit.png", "b-edit.png", "sub/a-edit.png"]
    assert Image.open(out / "sub" / "a-edit.png").size == (48, 24)
    assert "3 done, 0 skipped, 0 failed" in first.stderr
    record = json.loads(Image.open(out / "a-edit.png").text["icd"])
    assert {"model", "model_hash", "backend", "src", "tgt", "sampler", "steps", "guidance", "tau", "method", "seed",
            "icd_version", "input", "input_size", "input_sha256"} <= record.keys()  # fmt: skip
    # the release's SD1.5 recipe, the default of SD1.5-family models given by parts
    assert record["method"] == "p2p" and record["p2p"]["cross_replace"] == 0.3 and record["p2p"]["amplify_new"] == 4.0
    assert record["input_size"] == [32, 24] and record["model_hash"].startswith("sha256")
    again = _run(*args)
    assert again.exit_code == 0 and [line["status"] for line in _lines(again)][:3] == ["skipped"] * 3
    # outputs written beside the inputs are not taken as inputs by the next run
    beside = _run("edit", photos, "-r", *PROMPTS, "--model", merged_dir)
    assert beside.exit_code == 0 and (photos / "sub" / "a-edit.png").is_file()
    beside_again = _lines(_run("edit", photos, "-r", *PROMPTS, "--model", merged_dir, "--json"))
    assert [line["status"] for line in beside_again] == ["skipped"] * 3 + ["summary"]


def test_spec_batch_with_bad_rows(merged_dir, tmp_path):
    _photo(tmp_path / "pics" / "a.png")
    spec = tmp_path / "edits.jsonl"
    spec.write_text(
        "\n".join(
            [
                json.dumps({"image": "pics/a.png", "src": "a cat", "tgt": "a dog", "guidance": 2.5, "seed": 3}),
                json.dumps({"image": "pics/a.png", "src": "a cat", "tgt": "a fox"}),
                json.dumps({"image": "pics/missing.png", "src": "a cat", "tgt": "a dog"}),
                json.dumps({"image": "pics/a.png", "tgt": "a dog"}),  # no src anywhere
                "{broken",
            ]
        )
    )
    result = _run("edit", "--spec", spec, "--model", merged_dir, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "3 of 5 inputs failed" in result.stderr
    lines = _lines(result)
    assert [line["status"] for line in lines] == ["done", "done", "failed", "failed", "failed", "summary"]
    assert "no such file" in lines[2]["error"] and "no src" in lines[3]["error"] and ":5" in lines[4]["item"]
    assert _files(tmp_path / "out") == ["pics/a-edit-1.png", "pics/a-edit-2.png"]
    record = json.loads(Image.open(tmp_path / "out" / "pics" / "a-edit-1.png").text["icd"])
    assert (record["guidance"], record["seed"], record["tgt"]) == (2.5, 3, "a dog")
    assert "Traceback" not in result.output
    neither = _run("edit", tmp_path / "pics" / "a.png", "--model", merged_dir)
    assert neither.exit_code == 2 and "--src and --tgt are needed" in neither.stderr


def test_bad_numbers_in_spec_rows_fail_their_row_alone(merged_dir, tmp_path):
    _photo(tmp_path / "a.png")
    good = {"image": "a.png", "src": "a cat", "tgt": "a dog"}
    bad = [("seed", 99999999999999999999), ("seed", -1), ("seed", 1.5), ("seed", "1e400"), ("guidance", 1e308),
           ("tau", "nan"), ("tau", 2), ("guidance", True), ("guidance", [1])]  # fmt: skip
    rows = [json.dumps({**good, "output": f"bad{i}.png", name: value}) for i, (name, value) in enumerate(bad)]
    rows.insert(4, json.dumps({**good, "output": "good.png", "seed": 2**63 - 1}))
    rows += ['{"image": "a.png", "src": "a cat", "tgt": "a dog", "guidance": NaN, "output": "nan.png"}',
             '{"image": "a.png", "src": "a cat", "tgt": "a dog", "tau": -Infinity, "output": "inf.png"}']  # fmt: skip
    spec = tmp_path / "edits.jsonl"
    spec.write_text("\n".join(rows))
    csv_spec = tmp_path / "edits.csv"
    csv_spec.write_text("image,src,tgt,seed,output\na.png,a cat,a dog,99999999999999999999,c1.png\n"
                        "a.png,a cat,a dog,nan,c2.png\na.png,a cat,a dog,4,c3.png\n")  # fmt: skip
    for path, done in ((spec, ["good.png"]), (csv_spec, ["c3.png"])):
        result = _run("edit", "--spec", path, "--model", merged_dir, "--json", "-o", tmp_path / "out")
        assert result.exit_code == 1 and "Traceback" not in result.output
        lines = _lines(result)
        summary = lines.pop()
        assert summary["status"] == "summary" and summary["done"] == 1 and summary["failed"] == len(lines) - 1
        assert [Path(line["output"]).name for line in lines if line["status"] == "done"] == done
        for line in lines:
            if line["status"] == "failed":
                assert "must be" in line["error"] and "\n" not in line["error"], line
    assert _files(tmp_path / "out") == ["c3.png", "good.png"]


def test_a_record_with_bad_numbers_is_refused_in_one_line(merged_dir, tmp_path):
    from PIL import PngImagePlugin

    photo = _photo(tmp_path / "photo.png")
    for key, value in (("seed", 99999999999999999999), ("guidance", float("nan")), ("tau", "x"), ("seed", None)):
        record = {"src": "a cat", "tgt": "a dog", "seed": 1, "input": str(photo), "method": "swap", key: value}
        info = PngImagePlugin.PngInfo()
        info.add_text("icd", json.dumps(record))
        Image.new("RGB", (16, 16)).save(tmp_path / "tampered.png", pnginfo=info)
        result = _run("edit", "--from", tmp_path / "tampered.png", "--model", merged_dir, "-o", tmp_path / "o.png")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "not usable" in result.stderr, result.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_sharded_runs_cover_the_folder_exactly_once(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index in range(7):
        _photo(photos / f"p{index}.png", seed=index)
    out = tmp_path / "out"
    made = []
    for shard in ("0/3", "1/3", "2/3"):
        result = _run("edit", photos, "-o", out, *PROMPTS, "--model", merged_dir, "--shard", shard, "--json")
        assert result.exit_code == 0, result.output
        made += [line["output"] for line in _lines(result) if line["status"] == "done"]
    assert sorted(made) == sorted(str(out / f"p{index}-edit.png") for index in range(7))
    assert len(_files(out)) == 7


@pytest.mark.slow
def test_from_repeats_an_edit_exactly_and_flags_override(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png", 48, 32)
    first = _run("edit", photo, *PROMPTS, "--model", merged_dir, "--seed", 5, "--guidance", 3, "-o",
                 tmp_path / "first.png")  # fmt: skip
    assert first.exit_code == 0, first.output
    again = _run("edit", "--from", tmp_path / "first.png", "-o", tmp_path / "again.png", "--json")
    assert again.exit_code == 0, again.output
    record = _lines(again)[0]
    assert (record["seed"], record["guidance"], record["src"], record["tgt"]) == (5, 3.0, "a cat", "a dog")
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("first.png", "again.png")]
    assert np.array_equal(*pixels)
    records = [json.loads(Image.open(tmp_path / name).text["icd"]) for name in ("first.png", "again.png")]
    assert (
        records[0]["model_hash"] == records[1]["model_hash"] and records[1]["input"] == photo.name
    )  # relative to the output
    changed = _run("edit", "--from", tmp_path / "first.png", "--seed", 6, "-o", tmp_path / "six.png", "--json")
    assert changed.exit_code == 0 and _lines(changed)[0]["seed"] == 6
    assert json.loads(Image.open(tmp_path / "six.png").text["icd"])["guidance"] == 3.0
    assert not np.array_equal(pixels[0], np.asarray(Image.open(tmp_path / "six.png")))
    foreign = _run("edit", "--from", photo)
    assert foreign.exit_code == 1 and "no icd edit record" in foreign.stderr
    missing = _run("edit", "--from", tmp_path / "missing.png")
    assert missing.exit_code == 1 and "missing.png: no such file; give an image written by icd" in missing.stderr
    folder = _run("edit", "--from", tmp_path)
    assert folder.exit_code == 1 and "is a folder; give an image written by icd edit" in folder.stderr
    piped = _run("edit", "--from", tmp_path / "first.png", "-o", "-")
    assert piped.exit_code == 2 and "edit one piped image: leave out --from" in piped.stderr


def test_from_takes_the_model_from_the_model_flags_base_config_included(tmp_path):
    from PIL import PngImagePlugin

    photo = _photo(tmp_path / "photo.png")
    record = {"src": "a cat", "tgt": "a dog", "seed": 1, "input": str(photo), "method": "swap",
              "model": str(tmp_path / "gone")}  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text("icd", json.dumps(record))
    Image.new("RGB", (16, 16)).save(tmp_path / "made.png", pnginfo=info)
    recorded = _run("edit", "--from", tmp_path / "made.png", "-o", tmp_path / "o.png")
    assert recorded.exit_code == 1 and "is not a preset or a folder here" in recorded.stderr, recorded.output
    assert not (tmp_path / "o.png").exists()
    # --base-config is a model flag: the model comes from the flags (here the embedded one), not the record
    given = _run("edit", "--from", tmp_path / "made.png", "--base-config", tmp_path, "-o", tmp_path / "o.png")
    assert given.exit_code == 0, given.output
    assert json.loads(Image.open(tmp_path / "o.png").text["icd"])["model"] == "default"


def test_full_disk_fails_cleanly_and_stops(merged_dir, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    for index in range(3):
        _photo(photos / f"p{index}.png", seed=index)
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if str(fp).endswith(".part"):
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    result = _run("edit", photos, "-o", out, *PROMPTS, "--model", merged_dir, "--json")
    assert result.exit_code == 1 and "no space left" in result.stderr and "Traceback" not in result.output
    assert [line["status"] for line in _lines(result)] == ["failed", "summary"]  # the run stops at a full disk
    assert "stopped: fix the error above" in result.stderr, result.stderr
    assert _files(out) == []


def test_unreadable_and_non_utf8_names_and_damaged_weights(merged_dir, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    odd = Path(os.fsdecode(bytes(photos) + b"/caf\xe9-\xff.png"))
    _photo(odd)
    locked = _photo(photos / "locked.png")
    Path(os.fsdecode(bytes(photos) + b"/\xfe-broken.png")).write_bytes(b"junk")
    real_open = Image.open

    def no_permission(fp, *args, **kwargs):
        if str(fp) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", no_permission)
    result = _run("edit", photos, *PROMPTS, "--model", merged_dir, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = _lines(result)
    assert [line["status"] for line in lines] == ["done", "failed", "failed", "summary"]
    assert lines[0]["input"] == str(odd) and Path(lines[0]["output"]).is_file()
    assert "permission denied" in lines[1]["error"] and "not an image" in lines[2]["error"]
    assert "\\xfe-broken.png" in result.stderr or "\\udcfe-broken.png" in result.stderr  # printed, escaped
    broken = tmp_path / "model"
    shutil.copytree(merged_dir, broken)
    weights = broken / "reverse_unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    damaged = _run("edit", odd, *PROMPTS, "--model", broken, "-o", tmp_path / "x.png")
    message = damaged.stderr.strip()
    assert damaged.exit_code == 1 and len(message.splitlines()) == 1, damaged.output
    assert str(weights) in message and "download it again" in message and "truncated" in message


def test_long_prompt_warning_says_where_it_was_cut(merged_model, caplog):
    from icdcli.models.runtime import warn_if_truncated

    words = " ".join(f"w{i}" for i in range(200))
    with caplog.at_level("WARNING", logger="icd"):
        warn_if_truncated(merged_model, words)
        warn_if_truncated(merged_model, words)  # once per prompt
    assert len(caplog.records) == 1 and "cut after" in caplog.text and "words kept" in caplog.text


def test_huge_jpeg_is_decoded_at_reduced_scale_and_returned_at_its_size(merged_dir, tmp_path):
    from icdcli.io.images import load_image, original_size

    gradient = np.linspace(0, 255, 3000, dtype=np.uint8)[None, :, None].repeat(2000, 0).repeat(3, 2)
    Image.fromarray(gradient).save(tmp_path / "huge.jpg", quality=70)
    image = load_image(tmp_path / "huge.jpg", work_pixels=16 * 16)
    assert image.width <= 3000 // 8 and original_size(image) == (3000, 2000)
    assert load_image(tmp_path / "huge.jpg").size == (3000, 2000)
    result = _run("edit", tmp_path / "huge.jpg", *PROMPTS, "--model", merged_dir, "--json")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "huge-edit.png").size == (3000, 2000)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_current_image_and_a_rerun_resumes(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index in range(12):  # noise photos large enough that each takes a noticeable time to read and write
        _photo(photos / f"p{index:02d}.png", 640, 480, seed=index)
    out = tmp_path / "out"
    icd = [sys.executable, "-c", "from icdcli.cli.main import main; main()"]
    # batches of 2 after the first image: Ctrl-C finishes the batch in the networks, and 11 would be all the rest
    command = [*icd, "edit", str(photos), "-o", str(out), *PROMPTS, "--model", str(merged_dir), "--json",
               "--batch-size", "2"]  # fmt: skip
    env = {**os.environ, "ICD_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted:" in stderr
    made = _files(out)
    assert 1 <= len(made) < 12 and all(name.endswith("-edit.png") for name in made)  # no partial files
    for name in made:
        Image.open(out / name).load()
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "summary" and summary["done"] == len(made)
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (final["skipped"], final["done"], final["failed"]) == (len(made), 12 - len(made), 0)
    assert len(_files(out)) == 12


def _icd_process(command, **options):
    env = {**os.environ, "ICD_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    icd = [sys.executable, "-c", "from icdcli.cli.main import main; main()"]
    return subprocess.Popen([*icd, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **options)  # fmt: skip


def _wait_for_output(process, out, count=1):
    deadline = time.monotonic() + 120
    while not (out.is_dir() and sum(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()) >= count):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_exit_143_and_the_rerun_does_exactly_the_rest(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index in range(10):
        _photo(photos / f"p{index:02d}.png", 640, 480, seed=index)
    out = tmp_path / "out"
    command = ["edit", str(photos), "-o", str(out), *PROMPTS, "--model", str(merged_dir), "--json"]
    process = _icd_process(command)
    _wait_for_output(process, out)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated:" in stderr
    made = _files(out)
    assert 1 <= len(made) < 10 and all(name.endswith("-edit.png") for name in made)  # no partial or hidden files
    lines = _lines(type("R", (), {"stdout": stdout})())
    summary = lines[-1]
    assert summary["status"] == "summary" and summary["done"] == len(made) and summary["failed"] == 0
    assert sorted(Path(line["output"]).name for line in lines[:-1] if line["status"] == "done") == made
    rerun = _icd_process(command)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    rest = _lines(type("R", (), {"stdout": stdout})())
    assert rest[-1]["done"] == 10 - len(made) and rest[-1]["skipped"] == len(made) and rest[-1]["failed"] == 0
    assert sorted(Path(line["output"]).name for line in rest[:-1] if line["status"] == "skipped") == made
    assert len(_files(out)) == 10


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(tmp_path):
    photos = tmp_path / "photos"
    for index in range(2):
        _photo(photos / f"p{index}.png", seed=index)
    out = tmp_path / "out"
    process = _icd_process(["edit", str(photos), "-o", str(out), *PROMPTS])  # the default model: fused on load
    assert "loading" in process.stderr.readline()
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted:" in stderr
    assert not out.exists() or _files(out) == []


def _dead_pid():
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index in range(6):
        _photo(photos / f"p{index}.png", 320, 240, seed=index)
    out = tmp_path / "out"
    command = ["edit", str(photos), "-o", str(out), *PROMPTS, "--model", str(merged_dir), "--json"]
    process = _icd_process(command)
    _wait_for_output(process, out)
    process.kill()  # SIGKILL: no cleanup at all
    process.communicate(timeout=60)
    dead = _dead_pid()
    planted = [out / f".p0-edit.png.icd-{dead}-0a1b2c3d.part", out / ".p1-edit.png.icd-claim"]
    for path in planted:
        path.write_bytes(b"half a file")
    foreign = [out / ".p2-edit.png.part", out / f".notes.icd-{dead}.part", out / "p3-edit.png.icd-claim.txt"]
    for path in foreign:
        path.write_bytes(b"not icd's")
    live = out / f".p4-edit.png.icd-{os.getpid()}-00ff00ff.part"  # a process that still runs: this one
    live.write_bytes(b"being written")
    rerun = _icd_process(command)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "unfinished file(s) of an earlier run" in stderr
    assert not any(path.exists() for path in planted)
    assert all(path.exists() for path in [*foreign, live])
    for path in [*foreign, live]:
        path.unlink()
    assert _files(out) == [f"p{index}-edit.png" for index in range(6)]


@pytest.mark.slow
def test_two_processes_on_one_output_folder_do_every_item_exactly_once(merged_dir, tmp_path):
    photos = tmp_path / "photos"
    for index in range(8):
        _photo(photos / f"p{index}.png", 320, 240, seed=index)
    out = tmp_path / "out"
    command = ["edit", str(photos), "-o", str(out), *PROMPTS, "--model", str(merged_dir), "--json"]
    processes = [_icd_process(command) for _ in range(2)]
    results = [(process, *process.communicate(timeout=300)) for process in processes]
    done = []
    for process, stdout, stderr in results:
        assert process.returncode == 0, stderr
        lines = _lines(type("R", (), {"stdout": stdout})())
        summary = lines.pop()
        assert summary["failed"] == 0 and summary["done"] + summary["skipped"] == 8
        done += [line["output"] for line in lines if line["status"] == "done"]
    assert sorted(done) == sorted(str(out / f"p{index}-edit.png") for index in range(8))  # each once, none twice
    assert _files(out) == [f"p{index}-edit.png" for index in range(8)]


def test_damaged_onnx_file_says_what_to_do(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from icdcli.core.errors import ICDError
    from icdcli.engines.onnxruntime import OrtGraph

    junk = tmp_path / "export" / "reverse_unet.onnx"
    junk.parent.mkdir()
    junk.write_bytes(b"\x08\x07 not a graph")
    with pytest.raises(ICDError, match="delete the folder .*export and run again"):
        OrtGraph(junk, None, device=torch.device("cpu"), vae_scale_factor=8)


def test_an_exported_graph_with_a_changed_byte_is_reported_at_load(tmp_path):
    """A graph is checked against the sha256 its export recorded: a flipped byte in its weights, which would still
    parse as a graph, is caught at load with what to do; the recorded bytes pass."""
    pytest.importorskip("onnxruntime")
    import torch

    from icdcli.core.digests import files_sha256
    from icdcli.core.errors import ICDError
    from icdcli.engines.onnxruntime import OrtGraph
    from icdcli.export.manifest import GraphSpec

    graph = tmp_path / "export" / "vae_decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    spec = GraphSpec("vae_decoder", graph.name, [], [], sha256=files_sha256([graph]))
    OrtGraph(graph, spec, device=torch.device("cpu"), vae_scale_factor=8)  # the recorded bytes: no error
    data = bytearray(graph.read_bytes())
    data[1000] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ICDError, match="sha256 differs.*delete the folder .*export and run again"):
        OrtGraph(graph, spec, device=torch.device("cpu"), vae_scale_factor=8)


def test_claims_share_outputs_between_processes_and_survive_file_systems_without_locks(tmp_path, monkeypatch):
    from icdcli.io import claims

    output = tmp_path / "x-edit.png"
    mine = claims.claim(output)
    assert mine is not None and claims.claim_owner(output) == str(os.getpid())
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from icdcli.io.claims import "
                            f"claim; sys.exit(0 if claim(Path({str(output)!r})) is None else 1)"])  # fmt: skip
    assert other.returncode == 0  # another process cannot claim what this one holds
    assert claims.sweep(tmp_path) == []  # a held claim is not stale
    mine.release()
    assert list(tmp_path.iterdir()) == []

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(claims.fcntl, "flock", no_locks)
    unlocked = claims.claim(output)  # without locks every process goes on (as before claims existed)
    assert unlocked is not None
    stray = tmp_path / ".y.png.icd-claim"
    stray.write_bytes(b"")
    assert claims.sweep(tmp_path) == [] and stray.exists()  # and nothing is swept where no lock can tell
    unlocked.release()
