import json
import os
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main


def _photo(path, width=40, height=24, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from click.testing import CliRunner; from icdcli.cli.main import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime', 'tensorrt') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _commands(group=main, path=()):
    import click

    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize(
    "path, command", list(_commands()), ids=lambda value: "-".join(value) if isinstance(value, tuple) else ""
)
def test_every_command_explains_itself(path, command):
    """Every command and subcommand says what it does, and every option it takes says what it is for."""
    import click

    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = " ".join((command.help or "").split("\n\n")[0].split())
    assert summary and summary[:40] in " ".join(result.output.split())
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    assert [p.opts[0] for p in options if not (p.help or "").strip()] == []  # no option without help
    assert [p.opts[0] for p in options if p.opts[0] not in result.output] == []


def test_edit_json_record_and_output(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.jpg")
    result = _run("edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert {"input", "output", "model", "backend", "seed", "seconds"} <= record.keys()
    assert {"load", "encode", "decode", "total"} <= record["seconds"].keys()
    assert record["backend"] == "torch" and record["seed"] == 30 and record["steps"] == 4  # the SD1.5 release recipe
    assert record["precision"] == "float32"  # what the output's own record says, repeated
    assert record["output"] == str(tmp_path / "photo-edit.png")
    edited = Image.open(record["output"])
    assert edited.size == (40, 24) and json.loads(edited.text["icd"])["tgt"] == "a dog"
    assert _listing(tmp_path) == ["photo-edit.png", "photo.jpg"]


def test_edit_is_deterministic_skips_a_done_output_and_never_replaces_silently(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    args = ["edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir]
    assert _run(*args).exit_code == 0
    first = np.asarray(Image.open(tmp_path / "photo-edit.png"))
    again = _run(*args)  # same parameters: the output is found and skipped
    assert again.exit_code == 0 and "skipped" in again.stderr
    assert _listing(tmp_path) == ["photo-edit.png", "photo.png"]
    other = _run(*args, "-o", tmp_path / "copy.png")  # the same edit elsewhere gives the same pixels
    assert other.exit_code == 0 and np.array_equal(first, np.asarray(Image.open(tmp_path / "copy.png")))
    changed = _run(*args, "--seed", 7)  # other parameters onto an existing output: refused, not replaced
    assert changed.exit_code == 1 and "--overwrite" in changed.stderr and "seed" in changed.stderr
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "photo-edit.png")))
    assert _run(*args, "--seed", 7, "--overwrite").exit_code == 0
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "photo-edit.png")))
    refused = _run(*args, "-o", photo)
    assert refused.exit_code != 0 and "one of the inputs" in refused.output


def test_edit_many_into_a_folder_with_a_bad_one(merged_dir, tmp_path):
    good = [_photo(tmp_path / f"p{i}.png", 32 + 8 * i, 32, seed=i) for i in range(2)]
    (tmp_path / "broken.png").write_text("not a png")
    out = tmp_path / "out"
    result = _run("edit", *good, tmp_path / "broken.png", "--src", "a cat", "--tgt", "a dog", "--model", merged_dir,
                  "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 1
    assert _listing(out) == ["p0-edit.png", "p1-edit.png"]
    statuses = [json.loads(line)["status"] for line in result.stdout.strip().splitlines()]
    assert statuses == ["done", "done", "failed", "summary"]
    assert "broken.png: not an image" in result.stderr and "1 of 3 inputs failed" in result.stderr
    assert Image.open(out / "p1-edit.png").size == (40, 32)


def test_edit_with_ddim_baseline(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    result = _run("edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir, "--sampler", "ddim",
                  "--ddim-steps", 5, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["sampler"], record["steps"], record["guidance"], record["tau"]) == ("ddim", 5, 8.0, 1.0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_edit_from_released_format_parts(family, request, tmp_path):
    parts = request.getfixturevalue(f"{family}_parts")
    photo = _photo(tmp_path / "photo.png", 48, 32)
    result = _run("edit", photo, "--src", "a cat", "--tgt", "a dog", "--base", parts.base, "--teacher",
                  parts.teacher_pt, "--forward-lora", parts.forward_lora, "--reverse-lora", parts.reverse_lora,
                  "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(json.loads(result.stdout)["output"]).size == (48, 32)


def test_invert_and_reconstruct(merged_dir, tmp_path):
    from safetensors import safe_open

    photo = _photo(tmp_path / "photo.png")
    result = _run("invert", photo, "--prompt", "a cat", "--model", merged_dir, "--reconstruct", tmp_path / "back.png",
                  "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["output"] == str(tmp_path / "photo.latent.safetensors")
    with safe_open(record["output"], "pt") as handle:
        metadata = handle.metadata()
        latents = handle.get_tensor("latents")
    assert metadata["prompt"] == "a cat" and json.loads(metadata["forward_boundaries"]) == [19, 259, 519, 779]
    # 40x24 fits the tiny model's 16x16 area as 20x12 pixels -> 10x6 latents (VAE factor 2)
    assert tuple(latents.shape) == (1, 4, 6, 10)
    assert Image.open(tmp_path / "back.png").size == (40, 24)
    said = _run("invert", photo, "--prompt", "a cat", "--model", merged_dir, "--reconstruct", tmp_path / "again.png")
    assert said.exit_code == 0 and "wrote" in said.stderr and "again.png" in said.stderr, said.output
    bad = _run("invert", photo, "--prompt", "a cat", "--model", merged_dir, "-o", tmp_path / "latent.bin")
    assert bad.exit_code != 0 and ".safetensors" in bad.output


def test_generate(merged_dir, tmp_path):
    result = _run("generate", "a red circle", "--model", merged_dir, "-o", tmp_path / "g.png", "--width", 24,
                  "--height", 16, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g.png").size == (24, 16)
    odd = _run("generate", "a red circle", "--model", merged_dir, "-o", tmp_path / "h.png", "--width", 18)
    assert odd.exit_code != 0 and "multiples of 4" in odd.output


def test_info_json():
    result = _run("info", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["backends"]["torch"]["importable"] is True
    assert {"sd15", "sd15-3step", "sdxl"} <= {preset["name"] for preset in report["presets"]}
    assert "root" in report["cache"]
    import shutil

    from icdcli.core.paths import cache_root

    free, now = report["cache"]["free_bytes"], shutil.disk_usage(cache_root().parent).free
    assert isinstance(free, int) and abs(free - now) <= max(now, 2**30) * 0.1  # the cache's disk, as it was then
    text = _run("info")
    assert text.exit_code == 0 and f"cache: {cache_root()} (" in text.output and "GB free on its disk" in text.output


def _bad_input_cases(tmp_path):
    (tmp_path / "notes.jpg").write_text("plain text, not a photo")
    noise = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    good = str(_photo(tmp_path / "good.png"))
    return {
        "missing file": ([str(tmp_path / "nope.png"), "--src", "a cat", "--tgt", "a dog"], "no such file"),
        "non-image": ([str(tmp_path / "notes.jpg"), "--src", "a cat", "--tgt", "a dog"], "not an image"),
        "truncated jpeg": ([str(tmp_path / "cut.jpg"), "--src", "a cat", "--tgt", "a dog"], "damaged"),
        "1x1 image": ([str(tmp_path / "dot.png"), "--src", "a cat", "--tgt", "a dog"], "too small"),
        "empty prompt": ([good, "--src", "a cat", "--tgt", "  "], "--tgt is empty"),
        "missing output folder": (
            [good, "--src", "a cat", "--tgt", "a dog", "-o", str(tmp_path / "no" / "where.png")],
            "does not exist",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing file", "non-image", "truncated jpeg", "1x1 image", "empty prompt", "missing output folder"]
)
def test_bad_input_is_one_line_error_and_leaves_nothing(case, merged_dir, tmp_path):
    args, expected = _bad_input_cases(tmp_path)[case]
    before = _listing(tmp_path)
    result = _run("edit", *args, "--model", merged_dir)
    usage = case == "empty prompt"  # a bad flag value: a usage error, exit 2, after click's usage lines
    assert result.exit_code == (2 if usage else 1)
    lines = result.stderr.strip().splitlines()
    if usage:
        assert lines[0].startswith("Usage: ")
        lines = [line for line in lines if line.startswith("Error: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert _listing(tmp_path) == before


def test_unwritable_output_folder(merged_dir, tmp_path, monkeypatch):
    import os

    photo = _photo(tmp_path / "photo.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("os.access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    result = _run("edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir, "-o", locked / "x.png")
    assert result.exit_code == 1 and "not writable" in result.stderr
    assert _listing(locked) == []


def test_missing_default_model_explains_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr("icdcli.models.sources.DEFAULT_MODEL_DIR", tmp_path / "absent")
    result = _run("edit", _photo(tmp_path / "p.png"), "--src", "a cat", "--tgt", "a dog")
    assert result.exit_code == 1 and "--model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_edit_on_onnxruntime_matches_torch_and_says_so(merged_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    photo = _photo(tmp_path / "photo.png")
    # the CPU path: on a GPU machine "auto" would pick TensorRT or the GPU, not ONNX Runtime on the CPU
    args = ["edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir, "--json", "--device", "cpu"]
    on_torch = _run(*args, "-o", tmp_path / "torch.png", "--backend", "torch")
    on_ort = _run(*args, "-o", tmp_path / "ort.png", "--backend", "auto")
    assert on_ort.exit_code == 0, on_ort.output
    assert json.loads(on_ort.stdout)["backend"] == "onnxruntime" and json.loads(on_torch.stdout)["backend"] == "torch"
    assert "backend: onnxruntime (auto)" in on_ort.stderr and "ONNX (first use)" in on_ort.stderr
    # fp32 graphs differ from PyTorch only in summation order (~1e-6): at most a rounding flip in uint8
    difference = np.abs(
        np.asarray(Image.open(tmp_path / "torch.png"), dtype=int)
        - np.asarray(Image.open(tmp_path / "ort.png"), dtype=int)
    )
    assert difference.max() <= 2


def test_naming_a_backend_that_cannot_run_is_a_clear_error(merged_dir, tmp_path):
    result = _run("edit", _photo(tmp_path / "p.png"), "--src", "a cat", "--tgt", "a dog", "--model", merged_dir,
                  "--backend", "tensorrt")  # fmt: skip
    assert result.exit_code == 1 and "--backend tensorrt needs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _strict_lines(result):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in result.stdout.strip().splitlines()]


@pytest.mark.slow
def test_generate_and_invert_replace_only_what_icd_made_with_the_same_parameters(merged_dir, tmp_path):
    from icdcli.io.images import read_record
    from icdcli.run.outputs import read_latent_record

    photo = _photo(tmp_path / "photo.png")
    foreign = {name: tmp_path / name for name in ("mine.png", "mine.safetensors", "back.png")}
    for path in foreign.values():
        path.write_bytes(b"the user's own file")
    model = ["--model", merged_dir, "--json"]
    attempts = [
        ("generate", "a cat", "-o", foreign["mine.png"]),
        ("invert", photo, "--prompt", "a cat", "-o", foreign["mine.safetensors"]),
        ("invert", photo, "--prompt", "a cat", "-o", tmp_path / "l.safetensors", "--reconstruct", foreign["back.png"]),
    ]
    for attempt in attempts:
        refused = _run(*attempt, *model)
        assert refused.exit_code == 1 and "not made by icd" in refused.stderr and "--overwrite" in refused.stderr
        (line,) = _strict_lines(refused)
        assert line["status"] == "failed" and "--overwrite" in line["error"] and {"input", "output"} <= line.keys()
    assert all(path.read_bytes() == b"the user's own file" for path in foreign.values())
    assert not (tmp_path / "l.safetensors").exists()
    generate = ["generate", "a cat", "-o", tmp_path / "g.png", *model]
    invert = ["invert", photo, "--prompt", "a cat", "-o", tmp_path / "l.safetensors", "--reconstruct",
              tmp_path / "r.png", *model]  # fmt: skip
    for command in (generate, invert):
        first, again = _run(*command), _run(*command)
        assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
        assert _strict_lines(first)[0]["status"] == "done" and _strict_lines(again)[0]["status"] == "skipped"
        other = _run(*command, "--seed", 4)
        default_seed = 0 if command is generate else 30  # invert takes the SD1.5 recipe's seed, as edit does
        assert other.exit_code == 1 and f"seed {default_seed} -> 4" in other.stderr
        assert _run(*command, "--seed", 4, "--overwrite").exit_code == 0
    assert read_record(tmp_path / "g.png")["seed"] == 4 and read_record(tmp_path / "g.png")["command"] == "generate"
    latent, recon = read_latent_record(tmp_path / "l.safetensors"), read_record(tmp_path / "r.png")
    assert latent["command"] == "invert" and latent["seed"] == 4 and latent["input_sha256"].startswith("sha256:")
    assert recon["command"] == "invert-reconstruct" and recon["guidance"] == 1.0 and recon["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["photo.png", "g.png", "l.safetensors", "r.png", *foreign]
    )


def test_default_names_never_replace_a_file_icd_did_not_make(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    (tmp_path / "photo.latent.safetensors").write_bytes(b"someone else's")
    result = _run("invert", photo, "--prompt", "a cat", "--model", merged_dir, "--json")
    assert result.exit_code == 0 and _strict_lines(result)[0]["output"] == str(tmp_path / "photo.latent-1.safetensors")
    assert (tmp_path / "photo.latent.safetensors").read_bytes() == b"someone else's"


def test_an_input_given_twice_is_one_item(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    result = _run("edit", photo, tmp_path / "." / "photo.png", tmp_path, "--src", "a cat", "--tgt", "a dog",
                  "--model", merged_dir, "--json", "-o", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _strict_lines(result)
    assert [line["status"] for line in lines] == ["done", "summary"]
    assert result.stderr.count("is the same edit as") == 1  # both repeats read "photo.png ... photo.png": said once
    assert _listing(tmp_path / "out") == ["photo-edit.png"]


@pytest.mark.parametrize("where", ["/tmp/elsewhere.png", "../up.png", "sub/../../up.png"])
def test_a_spec_output_may_not_leave_the_output_folder_unless_allowed(merged_dir, tmp_path, where):
    _photo(tmp_path / "photo.png")
    spec = tmp_path / "spec.jsonl"
    rows = [{"image": "photo.png", "src": "a cat", "tgt": "a dog", "output": where},
            {"image": "photo.png", "src": "a cat", "tgt": "a fox", "output": "fine.png"}]  # fmt: skip
    spec.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "out"
    result = _run("edit", "--spec", spec, "--model", merged_dir, "--json", "-o", out)
    assert result.exit_code == 1
    failed, done, summary = _strict_lines(result)
    assert (
        failed["status"] == "failed"
        and "leaves the output folder" in failed["error"]
        and "--any-output" in failed["error"]
    )
    assert done["status"] == "done" and summary["failed"] == 1
    assert _listing(out) == ["fine.png"] and not (tmp_path / "up.png").exists()
    if where.startswith("/"):
        return  # not written outside the test's folder
    allowed = _run("edit", "--spec", spec, "--model", merged_dir, "--json", "-o", out, "--any-output")
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "up.png").exists()


def test_an_unwritable_cache_says_what_to_set_and_falls_back_once(merged_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    monkeypatch.setenv("ICD_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    monkeypatch.setenv("ICD_BACKEND", "auto")
    photos = [_photo(tmp_path / f"p{index}.png", seed=index) for index in range(2)]
    common = ["--model", merged_dir, "--device", "cpu", "--json"]
    edited = _run("edit", *photos, "--src", "a cat", "--tgt", "a dog", "-o", tmp_path / "out", *common)
    assert edited.exit_code == 0, edited.output
    assert [line["status"] for line in _strict_lines(edited)] == ["done", "done", "summary"]
    assert edited.stderr.count("ICD_CACHE_DIR") == 1 and edited.stderr.count("note: backend torch instead") == 1
    for command in (["generate", "a cat", "-o", tmp_path / "g.png"],
                    ["invert", photos[0], "--prompt", "a cat", "-o", tmp_path / "l.safetensors"]):  # fmt: skip
        result = _run(*command, *common)
        assert result.exit_code == 0 and "ICD_CACHE_DIR" in result.stderr and "Traceback" not in result.output
        assert _strict_lines(result)[0]["status"] == "done"
    named = _run("generate", "a cat", "-o", tmp_path / "h.png", *common, "--backend", "onnxruntime")
    assert named.exit_code == 1 and "ICD_CACHE_DIR" in named.stderr and not (tmp_path / "h.png").exists()
    assert len([line for line in named.stderr.splitlines() if line.startswith("Error")]) == 1


@pytest.mark.parametrize(
    ("size", "message"),
    [((4096, 4096), "the largest square this machine can make is about"), ((18, 16), "multiples of 4")],
)
def test_sizes_are_checked_before_the_model_loads(merged_dir, tmp_path, monkeypatch, size, message):
    import icdcli.models.sources

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(icdcli.models.sources, "load_requested_model", no_loading)
    result = _run("generate", "a cat", "--model", merged_dir, "--width", size[0], "--height", size[1], "-o",
                  tmp_path / "g.png", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert _listing(tmp_path) == []


def test_the_largest_square_fits_and_the_next_does_not():
    from icdcli.run.limits import Sizes, largest_square, needed_bytes

    sizes = Sizes(512, 64, 8)
    for budget in (2**30, 16 * 2**30, 80 * 2**30):
        side = largest_square(budget, sizes)
        assert side % 64 == 0 and needed_bytes(side, side, 8) <= budget < needed_bytes(side + 64, side + 64, 8)


def test_messages_say_what_is_wrong_with_links_prompts_frames_and_unknown_words(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    base = ["--src", "a cat", "--tgt", "a dog", "--model", merged_dir]
    loop = _run("edit", tmp_path / "loop-a.png", *base, "-o", tmp_path / "x.png")
    assert loop.exit_code == 1 and "loops back on itself" in loop.stderr and "Traceback" not in loop.output
    dangling = _run("edit", tmp_path / "dangling.png", *base, "-o", tmp_path / "x.png")
    assert dangling.exit_code == 1 and "nowhere.png, which does not exist" in dangling.stderr
    empty_target = _run("edit", photo, "--src", "a cat", "--tgt", "", "--model", merged_dir)
    assert (
        empty_target.exit_code == 2 and "--tgt is empty" in empty_target.stderr and "--src" not in empty_target.stderr
    )
    alone = _run("edit", photo, "--tgt", "a dog", "--model", merged_dir)
    assert alone.exit_code == 2 and "--src is needed" in alone.stderr
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=50)
    animated = _run("edit", tmp_path / "moving.gif", *base, "-o", tmp_path / "moving.png")
    assert animated.exit_code == 0 and "animated (3 frames); its first frame is used" in animated.stderr
    unknown = _run("edit", photo, "--src", "a cat", "--tgt", "🙂🙂", "--model", merged_dir, "-o", tmp_path / "u.png")
    assert unknown.exit_code == 0 and "--tgt '🙂🙂': the model knows none of its words" in unknown.stderr
    generated = _run("generate", "кошка", "--model", merged_dir, "-o", tmp_path / "g.png")
    assert generated.exit_code == 0 and "PROMPT 'кошка': the model knows none of its words" in generated.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == [
        "g.png", "moving.gif", "moving.png", "photo.png", "u.png"
    ]  # fmt: skip


def test_a_folder_icd_did_not_make_is_never_replaced(merged_dir, tmp_path):
    from icdcli.io.atomic import atomic_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"irreplaceable")
    with pytest.raises(FileExistsError, match="not made by icd"), atomic_folder(mine) as staging:
        (staging / "icd.json").write_text("{}")
    model_folder = tmp_path / "model"
    with atomic_folder(model_folder) as staging:  # new, then replaced: icd made it
        (staging / "icd.json").write_text("{}")
    with atomic_folder(model_folder) as staging:
        (staging / "icd.json").write_text('{"second": 1}')
    assert json.loads((model_folder / "icd.json").read_text()) == {"second": 1}
    exported = _run("export", "--model", merged_dir, "--out", mine)
    assert exported.exit_code == 1 and "is not an icd export" in exported.stderr and "Traceback" not in exported.output
    over_model = _run("export", "--model", merged_dir, "--out", model_folder)  # an export never replaces a model
    assert over_model.exit_code == 1 and "manifest.json" in over_model.stderr
    (mine / "manifest.json").write_text('{"name": "my web app"}')  # a manifest.json that is not icd's
    web = _run("export", "--model", merged_dir, "--out", mine)
    assert web.exit_code == 1 and "is not an icd export (no icd manifest.json in it)" in web.stderr, web.output
    assert (mine / "holiday.jpg").read_bytes() == b"irreplaceable"
    made = _run("export", "--model", merged_dir, "--out", tmp_path / "export")
    assert made.exit_code == 0, made.output
    (tmp_path / "export" / "notes.txt").write_text("mine")  # the user's file inside icd's export
    again = _run("export", "--model", merged_dir, "--out", tmp_path / "export", "--force")
    assert again.exit_code == 1 and "also holds files icd did not write (notes.txt)" in again.stderr, again.output
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine"
    (tmp_path / "export" / "notes.txt").unlink()
    assert _run("export", "--model", merged_dir, "--out", tmp_path / "export", "--force").exit_code == 0
    from icdcli.core.paths import cache_root

    assert _run("export", "--model", merged_dir).exit_code == 0  # into icd's cache: icd's folder, whatever it holds
    (cached,) = (cache_root() / "onnx").iterdir()
    (cached / "left-by-an-older-icd.json").write_text("{}")
    assert _run("export", "--model", merged_dir, "--force").exit_code == 0
    assert not (cached / "left-by-an-older-icd.json").exists()
    assert json.loads((model_folder / "icd.json").read_text()) == {"second": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine", "model"]  # no staging folders left


def test_every_edit_failure_prints_one_json_line_with_the_common_shape(merged_dir, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    cases = [
        (["edit", photo, "--src", "a cat", "--model", merged_dir], "--tgt is needed"),
        (["edit", tmp_path / "missing.png", "--src", "a cat", "--tgt", "a dog", "--model", merged_dir], "no such file"),
        (["edit", photo, "--src", "a cat", "--tgt", "a dog", "--model", merged_dir, "-o", "/proc/x/"], "cannot be"),
        (["edit", "--spec", tmp_path / "none.jsonl", "--model", merged_dir], "no such file"),
    ]
    for index, (args, message) in enumerate(cases):
        result = _run(*args, "--json")
        expected = 2 if index == 0 else 1  # a missing --tgt is a usage error
        assert result.exit_code == expected and "Traceback" not in result.output, result.output
        (line,) = _strict_lines(result)
        assert line["status"] == "failed" and message in line["error"] and {"input", "output"} <= line.keys(), line
    batch = _run("edit", photo, tmp_path / "missing.png", "--src", "a cat", "--tgt", "a dog", "--model", merged_dir,
                 "-o", tmp_path / "out", "--json")  # fmt: skip
    assert [line["status"] for line in _strict_lines(batch)] == ["done", "failed", "summary"]


def test_staging_folders_of_a_killed_write_are_removed_by_the_next_one(tmp_path):
    from icdcli.io.atomic import atomic_folder

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    stale = tmp_path / f".model.icd-{dead}-0badcafe.part"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "weights.safetensors").write_bytes(b"half")
    live = tmp_path / f".other.icd-{os.getpid()}-0000aaaa.part"  # this process lives: not stale
    live.mkdir()
    with atomic_folder(tmp_path / "model") as staging:
        assert staging.name.startswith(".model.icd-") and staging.name.endswith(".part")
        (staging / "icd.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf"])
@pytest.mark.parametrize(
    "args",
    [["serve", "--max-upload-mb"], ["cache", "prune", "--older-than"], ["bench", "gpu", "--width-scale"],
     ["bench", "scale", "--width-scale"]],
)  # fmt: skip
def test_float_options_refuse_nan_and_infinity(args, value, tmp_path, monkeypatch):
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    result = _run(*args, value)
    said = ("is not a finite number", "is not in the range")  # inf meets an upper bound first where there is one
    assert result.exit_code == 2 and any(words in result.stderr for words in said), result.output


def test_running_out_of_memory_is_one_line_whatever_library_says_it():
    from icdcli.cli.common import reports_errors
    from icdcli.core.errors import memory_failure

    class OutOfMemoryError(RuntimeError):  # torch.cuda's, by name
        pass

    onnxruntime = RuntimeError(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
        "running MatMul node. Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::"
        "AllocateRawInternal Failed to allocate memory for requested buffer of size 137438953472"
    )
    for error in (MemoryError(), OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), onnxruntime):
        message = memory_failure(error)
        assert message is not None and message.startswith("out of memory") and "--width/--height" in message

        @click.command()
        @reports_errors
        def command(error=error):
            raise error

        result = CliRunner().invoke(command, [])
        assert result.exit_code == 1 and "Traceback" not in result.output and "Error: out of memory" in result.output
    assert "of size 137438953472)" in memory_failure(onnxruntime)
    assert memory_failure(RuntimeError("shapes do not match")) is None
