"""Hundreds of malformed and unusual images through one `icd edit` batch: each gives a clean result."""

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main

EXTENSIONS = [".png", ".jpg", ".webp", ".bmp", ".gif", ".tiff"]
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF", ".tiff": "TIFF"}


def _base(rng, width, height):
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _mode(image, mode):
    if mode == "I;16":
        return Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.int32) * 1000)
    if mode == "F":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
    if mode == "PA":
        return image.convert("P").convert("PA")
    return image.convert(mode)


def _encode(image, suffix, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[suffix], **options)
    return buffer.getvalue()


def _cases(rng):
    """(name, bytes) of valid-but-odd and broken files, all with image extensions."""
    cases = []
    modes = ["1", "L", "LA", "P", "PA", "I;16", "I", "F", "CMYK", "YCbCr", "RGBA", "RGB"]
    for mode in modes:
        for suffix in (".png", ".tiff", ".jpg", ".webp"):
            try:
                data = _encode(_mode(_base(rng, 40, 24), mode), suffix)
            except (OSError, ValueError, KeyError):
                continue  # that format cannot hold that mode
            cases.append((f"mode-{mode.replace(';', '')}{suffix}", data))
    valid = [(name, data) for name, data in cases]
    for index in range(90):  # truncated at random offsets
        name, data = valid[index % len(valid)]
        cut = int(rng.integers(0, max(1, len(data) - 1)))
        cases.append((f"cut{index}-{name}", data[:cut]))
    for index in range(40):  # random bytes
        suffix = EXTENSIONS[index % len(EXTENSIONS)]
        cases.append(
            (f"noise{index}{suffix}", rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
        )
    for index in range(30):  # corrupted headers
        name, data = valid[(7 * index) % len(valid)]
        damaged = bytearray(data)
        for position in rng.integers(0, min(len(damaged), 64), 4):
            damaged[position] = int(rng.integers(0, 256))
        cases.append((f"header{index}-{name}", bytes(damaged)))
    photo = _base(rng, 40, 24)
    for source, target in ((".png", ".jpg"), (".jpg", ".png"), (".gif", ".webp"), (".bmp", ".tiff")):
        cases.append((f"wrong-ext-{source[1:]}{target}", _encode(photo, source)))
    cases.append(("text.webp", b"just some text, not a picture\n"))
    cases.append(("empty.png", b""))
    for width, height in ((1, 300), (300, 1), (16, 4000), (4000, 16), (15, 15), (16, 16), (2, 2)):
        cases.append((f"size-{width}x{height}.png", _encode(_base(rng, width, height), ".png")))
    frames = [_base(rng, 32, 32).convert("P") for _ in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cases.append(("animated.gif", buffer.getvalue()))
    for orientation in (0, 1, 3, 6, 8, 9, 255):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases.append((f"exif-orientation-{orientation}.jpg", _encode(photo, ".jpg", exif=exif)))
    garbage = _encode(photo, ".jpg", exif=b"Exif\x00\x00" + rng.integers(0, 256, 60, dtype=np.uint8).tobytes())
    cases.append(("exif-garbage.jpg", garbage))
    return cases


@pytest.mark.slow
def test_two_hundred_malformed_inputs_in_one_batch(merged_dir, tmp_path):
    rng = np.random.default_rng(20241125)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _cases(rng)
    for name, data in cases:
        (inputs / name).write_bytes(data)
    assert len(cases) >= 200
    before = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "edit",
            str(inputs),
            "--src",
            "a cat",
            "--tgt",
            "a dog",
            "--model",
            str(merged_dir),
            "-o",
            str(out),
            "--json",
        ],  # fmt: skip
    )
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert result.exit_code == 1  # some inputs are broken; the run went on and says so at the end
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    summary = lines.pop()
    assert summary["status"] == "summary" and summary["done"] + summary["failed"] == len(cases)
    by_input = {line["input"].rsplit("/", 1)[-1]: line for line in lines}
    assert sorted(by_input) == before  # exactly one result per input
    done = set()
    for name, line in by_input.items():
        if line["status"] == "done":
            edited = Image.open(line["output"])
            edited.load()
            assert edited.mode == "RGB" and min(edited.size) >= 16, name
            done.add(line["output"].rsplit("/", 1)[-1])
        else:
            assert line["status"] == "failed" and name in line["error"] and "\n" not in line["error"], line
    assert summary["done"] >= 25 and summary["failed"] >= 100
    assert sorted(p.name for p in out.iterdir()) == sorted(done)  # no partial or stray files
    assert sorted(p.name for p in inputs.iterdir()) == before
    unusual_but_valid = [name for name in by_input if name.startswith("mode-")]
    assert all(by_input[name]["status"] == "done" for name in unusual_but_valid), unusual_but_valid
    for name in ("size-16x4000.png", "size-4000x16.png", "animated.gif", "mode-I16.png", "mode-F.tiff"):
        assert by_input[name]["status"] == "done", by_input[name]
    for name, expected in (("size-1x300.png", "too small"), ("empty.png", "not an image"), ("text.webp", "not an")):
        assert expected in by_input[name]["error"]


# --- hundreds of bad values, rows, records, file-system states and signals ---------------------------------
#
# Every case runs in this process through click's test runner with one loaded model, shared: a usage error
# costs milliseconds, a bad row fails before any network runs, and the few good items run the tiny model.

import os  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import PngImagePlugin  # noqa: E402

BAD_NUMBERS = ["nan", "-nan", "inf", "-inf", "Infinity", "1e308", "-1e308", "1e400", "99999999999999999999", "-1",
               "-0.5", "abc", "", " ", "0x1p3", "1,5", "1..2", "--", "None", "true", "1e", "½", "٣"]  # fmt: skip
NUMBER_FLAGS = {
    "edit": ["--guidance", "--tau", "--cross-replace", "--self-replace", "--blend-threshold", "--seed", "--ddim-steps"],
    "generate": ["--guidance", "--tau", "--seed", "--width", "--height", "--ddim-steps"],
    "invert": ["--guidance", "--tau", "--seed", "--ddim-steps"],
}
OTHER_BAD_FLAGS = [
    ("edit", "--method", "teleport"), ("edit", "--sampler", "euler"), ("edit", "--precision", "fp8"),
    ("edit", "--backend", "directml"), ("edit", "--shard", "3/2"), ("edit", "--shard", "x"),
    ("edit", "--shard", "-1/2"), ("edit", "--shard", "1/0"), ("edit", "--amplify", "dog"),
    ("edit", "--amplify", "=2"), ("edit", "--amplify", "dog=nan"), ("edit", "--amplify", "dog=inf"),
    ("edit", "--amplify", "dog=-1"), ("edit", "--amplify", "dog=1e308"), ("edit", "--amplify", "dog=x"),
    ("edit", "--device", "quantum"), ("generate", "--device", "cuda:99x"), ("invert", "--sampler", "x"),
    ("edit", "--from", "/nonexistent/x.png"), ("edit", "--spec", "/nonexistent/x.jsonl"),
    ("edit", "--spec", "/etc/hostname"), ("edit", "--spec", "/"),
]  # fmt: skip


def _strict(text):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _assert_clean(result, codes=(1, 2)):
    """A one-line error, no traceback, and on stdout nothing but strict JSON."""
    assert isinstance(result.exception, SystemExit), result.output  # not an exception nobody caught
    assert result.exit_code in codes, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1, result.stderr
    for line in result.stdout.splitlines():
        _strict(line)


def _command(name, folder, model):
    photo = folder / "photo.png"
    if not photo.exists():
        _base(np.random.default_rng(0), 40, 24).save(photo)
    return {
        "edit": ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "-o", str(folder / "out.png")],
        "generate": ["generate", "a cat", "-o", str(folder / "out.png")],
        "invert": ["invert", str(photo), "--prompt", "a cat", "-o", str(folder / "out.safetensors")],
    }[name] + ["--model", str(model), "--json"]


def test_hundreds_of_bad_flag_values_are_one_line_errors_before_any_work(merged_dir, tmp_path, one_model):
    cases = [(c, f, v) for c, flags in NUMBER_FLAGS.items() for f in flags for v in BAD_NUMBERS]
    cases += OTHER_BAD_FLAGS
    assert len(cases) >= 300
    runner = CliRunner()
    for command, flag, value in cases:
        result = runner.invoke(main, [*_command(command, tmp_path, merged_dir), flag, value])
        assert result.exit_code != 0, (flag, value)
        _assert_clean(result)
        assert flag in result.stderr or value in result.stderr, (flag, value, result.stderr)
    for value in ("nan", "inf", "-1", "1e400", "99999999999999999999"):
        for args in (["bench", "inversion", "--seed", value], ["bench", "shapes-edit", "--seed", value],
                     ["train", str(tmp_path / "run"), "--seed", value], ["train", str(tmp_path / "run"), "--minutes",
                     value], ["train", str(tmp_path / "run"), "--edit-guidance", value]):  # fmt: skip
            _assert_clean(runner.invoke(main, args), codes=(2,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing written, nothing left


def _bad_rows(rng):
    """(row text, why it fails) of spec rows that must fail on their own."""
    good = {"image": "photo.png", "src": "a cat", "tgt": "a dog"}
    rows = []
    for field in ("guidance", "tau", "seed"):
        for value in (*BAD_NUMBERS[:-3], True, False, [1], {"a": 1}, 10**25, -(10**25), 1e308, -1.5):
            if value in ("", " "):  # an empty cell means "the flag's value", not an error
                continue
            rows.append((json.dumps({**good, field: value}), field))
    for literal in ("NaN", "Infinity", "-Infinity"):
        for field in ("guidance", "tau", "seed"):
            rows.append((json.dumps(good)[:-1] + f', "{field}": {literal}}}', field))
    for field in ("src", "tgt", "output"):
        for value in (1, 2.5, True, [], ["a"], {"x": 1}):
            rows.append((json.dumps({**good, field: value}), field))
    for value in ("", "   ", None):
        rows.append((json.dumps({**good, "src": value}), "src"))
    for value in (None, "", 5, [], "missing.png", "folder", "loop.png", "dangling.png", "fifo.png", "garbage.png",
                  "../outside.png", "/nonexistent/abs.png", "bad\u0000name.png"):  # fmt: skip
        rows.append((json.dumps({**good, "image": value}), "image"))
    for value in ("/tmp/abs-out.png", "../up.png", "a/../../up.png", "out.txt", "x.gif"):
        rows.append((json.dumps({**good, "output": value}), "output"))
    for extra in ("colour", "Image", "", "seed "):
        rows.append((json.dumps({**good, extra: 1}), "field"))
    for text in ("{", "[1, 2]", '"a string"', "null", "42", '{"image": "photo.png"', "{'image': 'photo.png'}",
                 "\u0000", "{}" * 3):  # fmt: skip
        rows.append((text, "row"))
    for _ in range(20):  # random bytes that happen to be a line
        junk = rng.integers(32, 127, int(rng.integers(1, 40)), dtype=np.uint8).tobytes().decode()
        rows.append(("{" + junk.replace("\n", " "), "junk"))
    return rows


def test_hundreds_of_bad_spec_rows_fail_alone_and_every_good_row_is_done(merged_dir, tmp_path, one_model):
    rng = np.random.default_rng(7)
    _base(rng, 40, 24).save(tmp_path / "photo.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    bad = _bad_rows(rng)
    edits = [("a dog", 1), ("a red dog", 2), ("a blue cat", 3), ("a dog", 4)]
    good = [json.dumps({"image": "photo.png", "src": "a cat", "tgt": tgt, "seed": seed, "output": f"good{index}.png"})
            for index, (tgt, seed) in enumerate(edits)]  # fmt: skip
    lines = [text for text, _ in bad]
    for index, row in enumerate(good):  # good rows spread through the bad ones
        lines.insert(index * len(lines) // len(good), row)
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(lines), encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["edit", "--spec", str(spec), "-o", str(out), "--model", str(merged_dir),
                                       "--json"])  # fmt: skip
    assert len(bad) >= 150
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    records = [_strict(line) for line in result.stdout.splitlines()]
    assert records, result.output
    summary = records.pop()
    assert summary["status"] == "summary" and summary["done"] == len(good) and summary["failed"] == len(bad)
    assert summary["done"] + summary["failed"] + summary["skipped"] == len(lines)
    for record in records:
        if record["status"] == "failed":
            assert "spec.jsonl:" in record["item"] and record["error"] and "\n" not in record["error"], record
    assert sorted(p.name for p in out.iterdir()) == [f"good{index}.png" for index in range(len(good))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])  # nothing stray or outside


def _tampered_records(photo):
    base = {"src": "a cat", "tgt": "a dog", "seed": 1, "input": str(photo), "method": "swap", "sampler": "icd"}
    records = []
    for key in ("seed", "guidance", "tau"):
        for value in ("nan", float("nan"), float("inf"), 1e308, -1, 10**30, "x", [1], {"a": 1}, True):
            records.append({**base, key: value})
    for key in ("src", "tgt"):
        for value in ("", "  ", 5, None, ["a"]):
            records.append({**base, key: value})
    for key in ("src", "tgt", "seed"):
        records.append({k: v for k, v in base.items() if k != key})
    records += [{**base, "sampler": "euler"}, {**base, "method": "teleport"}, {**base, "model": "/nonexistent"},
                {**base, "input": "/nonexistent/photo.png"}]  # fmt: skip
    for p2p in ({"cross_replace": 5}, {"self_replace": "nan"}, {"amplify": [1, 2]}, {"amplify": {"dog": "inf"}},
                {"blend": 3}, {"blend_threshold": -1}, {"amplify": {"dog": 1e9}}):  # fmt: skip
        records.append({**base, "method": "p2p", "p2p": p2p})
    texts = [json.dumps(record) for record in records]
    texts += ["[1, 2]", "not json", '{"src": "a cat"', "null", '"string"', "{}", "", "\u0000" * 5]
    return texts


def test_bad_records_for_from_are_one_line_errors(merged_dir, tmp_path, one_model):
    photo = tmp_path / "photo.png"
    _base(np.random.default_rng(1), 40, 24).save(photo)
    texts = _tampered_records(photo)
    assert len(texts) >= 60
    runner = CliRunner()
    for index, text in enumerate(texts):
        info = PngImagePlugin.PngInfo()
        info.add_text("icd", text)
        record = tmp_path / "record.png"
        Image.new("RGB", (16, 16)).save(record, pnginfo=info)
        result = runner.invoke(main, ["edit", "--from", str(record), "-o", str(tmp_path / f"o{index}.png"), "--json"])
        _assert_clean(result, codes=(1,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "record.png"]


def test_file_system_states_fail_their_own_item_in_one_batch(merged_dir, tmp_path, one_model):
    photos = tmp_path / "in"
    photos.mkdir()
    rng = np.random.default_rng(3)
    good = ["plain.png", "b\u00e9b\u00e9.png", "with space.png", "x" * 200 + ".png", os.fsdecode(b"latin\xe9.png")]
    for name in good:
        _base(rng, 40, 24).save(photos / name)
    (photos / "sub").mkdir()
    (photos / "sub" / "again.png").symlink_to(photos / "with space.png")  # the same file again: made once
    states = {"loop.png": lambda p: p.symlink_to(p), "dangling.png": lambda p: p.symlink_to(photos / "nothing.png"),
              "fifo.png": lambda p: os.mkfifo(p), "empty.png": lambda p: p.write_bytes(b""),
              "dev.png": lambda p: p.symlink_to("/dev/zero"), "proc.png": lambda p: p.symlink_to("/proc/self/status"),
              "dir-link.png": lambda p: p.symlink_to(tmp_path)}  # fmt: skip
    for name, make in states.items():
        make(photos / name)
    out = tmp_path / "out"
    (out / "plain-edit.png").parent.mkdir()
    (out / "plain-edit.png").write_bytes(b"the user's file")  # not icd's: refused, not replaced
    (out / ".empty-edit.png.icd-1-deadbeef.part").write_bytes(b"")  # pid 1 lives: not ours to remove
    result = CliRunner().invoke(main, ["edit", str(photos), "-r", "-o", str(out), "--src", "a cat", "--tgt", "a dog",
                                       "--model", str(merged_dir), "--json"])  # fmt: skip
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1 and "Traceback" not in result.output
    records = [_strict(line) for line in result.stdout.splitlines()]
    summary = records.pop()
    by_name = {Path(record["input"]).name: record for record in records}
    failing = set(states) - {"dir-link.png"} | {"plain.png"}  # a link to a folder is not an image file listed
    assert {name for name, record in by_name.items() if record["status"] == "failed"} == failing, by_name
    # sub/again.png comes first in path order and stands for "with space.png"
    assert {name for name, record in by_name.items() if record["status"] == "done"} == (
        set(good) - {"plain.png", "with space.png"} | {"again.png"}
    )
    assert "is the same edit as" in result.stderr
    assert "not made by icd" in by_name["plain.png"]["error"] and "loops" in by_name["loop.png"]["error"]
    assert "not a regular file" in by_name["fifo.png"]["error"]
    assert summary["failed"] == len(failing)
    assert (out / "plain-edit.png").read_bytes() == b"the user's file"
    assert (out / ".empty-edit.png.icd-1-deadbeef.part").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_at_every_point_of_a_batch_leaves_whole_outputs_and_the_rerun_does_the_rest(
    merged_dir, tmp_path, one_model, monkeypatch, signum
):
    """The signal arrives inside the network (the item is dropped, or finished after one Ctrl-C) or while the
    output is written (finished), at each item in turn; the rerun does exactly what is missing. One item per network
    call (--batch-size 1), so that "the item in the network" is one item."""
    import icdcli.editing.edits
    import icdcli.io.images

    photos = tmp_path / "in"
    photos.mkdir()
    for index in range(4):
        _base(np.random.default_rng(index), 40, 24).save(photos / f"p{index}.png")
    command = ["edit", str(photos), "--src", "a cat", "--tgt", "a dog", "--model", str(merged_dir), "--json",
               "--batch-size", "1"]  # fmt: skip
    expected_code = 143 if signum == signal.SIGTERM else 130
    real_edit, real_save = icdcli.editing.edits.edit_batch, icdcli.io.images.save_image
    for stage in ("network", "write"):
        for at in range(4):
            out = tmp_path / f"out-{stage}-{at}"
            calls = {"n": 0}

            def signalled(real, *args, _at=at, _calls=calls, **kwargs):
                if _calls["n"] == _at:
                    os.kill(os.getpid(), signum)
                _calls["n"] += 1
                return real(*args, **kwargs)

            network = (icdcli.editing.edits, "edit_batch", real_edit)
            target = network if stage == "network" else (icdcli.io.images, "save_image", real_save)
            monkeypatch.setattr(target[0], target[1], lambda *a, _r=target[2], **k: signalled(_r, *a, **k))
            first = CliRunner().invoke(main, [*command, "-o", str(out)])
            monkeypatch.setattr(target[0], target[1], target[2])
            assert first.exit_code == expected_code, (stage, at, first.output)
            assert "Traceback" not in first.output
            lines = [_strict(line) for line in first.stdout.splitlines()]
            made = sorted(p.name for p in out.iterdir()) if out.exists() else []
            assert all(name.endswith("-edit.png") for name in made), made  # no partial or hidden files
            # writing runs on a worker thread while the next item is in the network, which may finish it too
            finished_current = stage == "write" or signum == signal.SIGINT
            allowed = {at + finished_current} | ({at + 2} if stage == "write" and at < 3 else set())
            assert len(made) in allowed and lines[-1]["done"] == len(made), (stage, at, made)
            rerun = CliRunner().invoke(main, [*command, "-o", str(out)])
            assert rerun.exit_code == 0, rerun.output
            summary = [_strict(line) for line in rerun.stdout.splitlines()][-1]
            assert (summary["done"], summary["skipped"]) == (4 - len(made), len(made))
            assert sorted(p.name for p in out.iterdir()) == [f"p{index}-edit.png" for index in range(4)]


def test_an_error_nobody_foresaw_fails_its_item_and_the_batch_goes_on(merged_dir, tmp_path, one_model, monkeypatch):
    import icdcli.editing.edits

    photos = tmp_path / "in"
    photos.mkdir()
    for index in range(6):
        _base(np.random.default_rng(index), 40, 24).save(photos / f"p{index}.png")
    surprises = {1: RuntimeError("a library's surprise"), 3: MemoryError(), 4: ZeroDivisionError("division by zero")}
    real_edit, calls = icdcli.editing.edits.edit_batch, {"n": 0}

    def surprising(*args, **kwargs):
        index, calls["n"] = calls["n"], calls["n"] + 1
        if index in surprises:
            raise surprises[index]
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(icdcli.editing.edits, "edit_batch", surprising)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["edit", str(photos), "-o", str(out), "--src", "a cat", "--tgt", "a dog",
                                       "--model", str(merged_dir), "--json", "--batch-size", "1"])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output and "3 of 6 inputs failed" in result.stderr
    records = [_strict(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in records] == ["done", "failed", "done", "failed", "failed", "done", "summary"]
    assert "RuntimeError: a library's surprise" in records[1]["error"] and "MemoryError" in records[3]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["p0-edit.png", "p2-edit.png", "p5-edit.png"]


@pytest.mark.parametrize("command", ["generate", "invert"])
def test_sigterm_in_generate_and_invert_exits_143_and_leaves_nothing(merged_dir, tmp_path, one_model, monkeypatch,
                                                                       command):  # fmt: skip
    import icdcli.editing.generation
    import icdcli.editing.inversion

    name = "generate" if command == "generate" else "invert_for_edit"  # what each command calls
    module = icdcli.editing.generation if command == "generate" else icdcli.editing.inversion
    real = getattr(module, name)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, _command(command, tmp_path, merged_dir))
    assert result.exit_code == 143 and "terminated" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler from before the command is back


# --- text: bounds, control characters, links ------------------------------------------------------------------

LONG = {"prompt": 1001, "word": 201, "path": 4097}  # one past each bound of icdcli.core.texts
CONTROLS = [chr(code) for code in (*range(0x00, 0x20), *range(0x7F, 0xA0))]


def _text_flag_cases(folder):
    """(command, flag or None for an argument, kind) of every text flag of edit, invert and generate."""
    return [
        ("edit", "--src", "prompt"), ("edit", "--tgt", "prompt"), ("edit", "--blend", "word"),
        ("edit", "--blend-src", "word"), ("edit", "--blend-tgt", "word"), ("edit", "-o", "path"),
        ("edit", "--spec", "path"), ("edit", "--from", "path"), ("edit", "--model", "path"),
        ("edit", "--teacher", "path"), ("invert", "--prompt", "prompt"), ("invert", "--reconstruct", "path"),
        ("invert", "-o", "path"), ("generate", "-o", "path"),
    ]  # fmt: skip


def test_every_text_flag_is_bounded_and_refuses_control_characters(merged_dir, tmp_path, one_model):
    runner = CliRunner()
    count = 0
    for command, flag, kind in _text_flag_cases(tmp_path):
        base = _command(command, tmp_path, merged_dir)
        undecoded = ["\udcff cat", "a \ud800"]  # bytes that were not UTF-8 on the command line, half a UTF-16 pair
        values = ["x" * LONG[kind], "y" * 5_000_000] + (CONTROLS + undecoded if kind != "path" else ["a\x00b"])
        for value in values:
            result = runner.invoke(main, [*base, flag, value])
            count += 1
            _assert_clean(result, codes=(2,))
            error = [line for line in result.stderr.splitlines() if line.startswith("Error")][0]
            assert flag in error and len(error) < 400, error  # names the flag, never echoes the text
            if value in undecoded:
                assert "not UTF-8 text" in error, error
            else:
                assert ("at most" in error) if len(value) > 100 else ("control character" in error or "NUL" in error)
    for value in ("p" * LONG["prompt"], "a\x00cat", "a\ncat", "a\x1b[31mcat", "\udcff circle"):  # generate's PROMPT
        result = runner.invoke(main, ["generate", value, "-o", str(tmp_path / "g.png"), "--model", str(merged_dir)])
        count += 1
        _assert_clean(result, codes=(2,))
        assert "PROMPT" in result.stderr
    assert count >= 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing written


def test_text_bounds_hold_for_spec_rows_jobs_lines_and_records(merged_dir, tmp_path, one_model):
    photo = tmp_path / "photo.png"
    _base(np.random.default_rng(0), 40, 24).save(photo)
    good = {"image": "photo.png", "src": "a cat", "tgt": "a dog"}
    rows = []
    for field, kind in (("src", "prompt"), ("tgt", "prompt"), ("blended_word", "word"), ("output", "path"),
                        ("image", "path")):  # fmt: skip
        rows.append({**good, field: "z" * LONG[kind]})
        rows += [{**good, field: f"a{c}b"} for c in (CONTROLS if kind != "path" else ["\x00"])]
    rows.append({**good, "src": "s" * 5_000_000})  # the 5 MB prompt: refused before any work
    lines = [json.dumps(row) for row in rows] + ["{" + "x" * 70_000 + "}"]  # a row past 64 KiB
    lines.insert(3, json.dumps({**good, "output": "kept.png"}))
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["edit", "--spec", str(spec), "-o", str(out), "--model", str(merged_dir),
                                       "--json"])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    records = [_strict(line) for line in result.stdout.splitlines()]
    summary = records.pop()
    assert (summary["done"], summary["failed"]) == (1, len(lines) - 1), summary
    for record in records:
        if record["status"] == "failed":
            assert len(record["error"]) < 400 and "\n" not in record["error"], record["error"][:200]
            image_row = "holds a NUL" in record["error"] or "4,097" in record["error"]
            assert record["input"] is None or record["input"].endswith("photo.png") or image_row, record
    assert [name for name in os.listdir(out)] == ["kept.png"]
    assert len(Image.open(out / "kept.png").text["parameters"]) < 1000
    # --jobs -: the same rows, one result line each, and a line past 64 KiB is one failed line
    absolute = {**good, "image": str(photo)}  # --jobs - reads paths against the working folder
    job_rows = [{**absolute, "src": "z" * LONG["prompt"]}, {**absolute, "tgt": "a\x00dog"},
                {**absolute, "blended_word": "cat\tdog"}, {**absolute, "output": "kept.png"},
                {**absolute, "image": "i" * LONG["path"]}]  # fmt: skip
    stdin = "\n".join([*(json.dumps(row) for row in job_rows), "{" + "x" * 200_000 + "}",
                       json.dumps({**absolute, "output": "job.png"})]) + "\n"  # fmt: skip
    jobs = CliRunner().invoke(main, ["edit", "--jobs", "-", "--model", str(merged_dir), "-o", str(out)], input=stdin)
    assert jobs.exit_code == 0, jobs.output
    results = [_strict(line) for line in jobs.stdout.splitlines()]
    assert [r["status"] for r in results] == ["failed", "failed", "failed", "skipped", "failed", "failed", "done"]
    assert results[0]["input"].endswith("photo.png") and "at most 1,000" in results[0]["error"]
    assert "longer than 65,536" in results[5]["error"]
    # a record whose prompt is past the bound, or holds a control character: --from refuses it in one line
    for prompt in ("q" * LONG["prompt"], "a\x00cat", "a\ncat"):
        info = PngImagePlugin.PngInfo()
        info.add_text("icd", json.dumps({"src": prompt, "tgt": "a dog", "seed": 1, "input": str(photo)}))
        Image.new("RGB", (16, 16)).save(tmp_path / "record.png", pnginfo=info)
        again = CliRunner().invoke(main, ["edit", "--from", str(tmp_path / "record.png"), "-o",
                                          str(tmp_path / "again.png")])  # fmt: skip
        _assert_clean(again, codes=(1,))
        assert "src" in again.stderr and any(rule in again.stderr for rule in ("at most", "control", "NUL"))
    assert not (tmp_path / "again.png").exists()


def test_a_spec_output_through_a_link_that_leaves_the_output_folder_fails_its_row(merged_dir, tmp_path, one_model):
    photo = tmp_path / "photo.png"
    _base(np.random.default_rng(0), 40, 24).save(photo)
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "away").symlink_to(outside)  # a folder link inside -o that points outside
    (out / "file-away.png").symlink_to(outside / "target.png")  # a file link, dangling, pointing outside
    (out / "inner").mkdir()
    (out / "here").symlink_to(out / "inner")  # a link that stays inside: allowed
    good = {"image": "photo.png", "src": "a cat", "tgt": "a dog"}
    rows = [{**good, "output": "away/x.png"}, {**good, "output": "file-away.png"},
            {**good, "output": "here/y.png", "seed": 1}, {**good, "output": "away/../z.png", "seed": 2}]  # fmt: skip
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    command = ["edit", "--spec", str(spec), "-o", str(out), "--model", str(merged_dir), "--json"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    records = [_strict(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed", "done", "failed", "summary"]
    assert all("leaves the output folder" in r["error"] for r in records if r["status"] == "failed")
    assert os.listdir(outside) == [] and (out / "inner" / "y.png").is_file()
    allowed = CliRunner().invoke(main, [*command[:1], "--any-output", *command[1:]])  # the user's explicit choice
    assert (outside / "x.png").is_file() and allowed.exit_code in (0, 1)


def test_paths_of_train_export_cache_and_bench_pie_are_bounded(tmp_path, monkeypatch):
    """Paths that reached the file system unchecked: one usage error naming the flag, before any work."""
    runner = CliRunner()
    cases = [(["train"], None), (["train", str(tmp_path / "run")], "--keep-stages"),
             (["export", "--model", str(tmp_path / "none")], "--out")]  # fmt: skip
    cases += [(["bench", "pie", "--root", str(tmp_path)], flag) for flag in ("--out", "--lpips", "--dino", "--clip")]
    cases += [(["bench", "pie"], "--root"), (["bench", "pie", "--root", str(tmp_path)], "--name")]
    count = 0
    for command, flag in cases:
        for value in ("p" * LONG["path"], "y" * 100_000, "a\x00b"):
            result = runner.invoke(main, [*command, *([flag] if flag else []), value])
            count += 1
            _assert_clean(result, codes=(2,))
            error = [line for line in result.stderr.splitlines() if line.startswith("Error")][0]
            assert (flag or "RUN_DIR") in error and len(error) < 400, error
            assert ("at most 4,096" in error) if len(value) > 100 else ("NUL" in error)
    assert count == 3 * len(cases) and list(tmp_path.iterdir()) == []  # nothing made
    for value in ("c" * LONG["path"], "c" * 100_000):  # icd cache reads its folder from ICD_CACHE_DIR
        monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path / value))
        for command in (["cache", "list"], ["cache", "prune", "--all"]):
            result = runner.invoke(main, command)
            _assert_clean(result, codes=(1,))
            assert "ICD_CACHE_DIR" in result.stderr and "at most 4,096" in result.stderr


def test_the_name_of_a_trained_model_is_bounded(tmp_path):
    """icd train --name becomes the packaged model's name, in its records and PNG text: a model name's bound."""
    for value in ("n" * 201, "a\tb", "a\nb", "a\x00b"):
        result = CliRunner().invoke(main, ["train", "--smoke", str(tmp_path / "run"), "--name", value])
        _assert_clean(result, codes=(2,))
        assert "--name" in result.stderr and "a model name may" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any training


def test_bench_pie_prompts_from_its_mapping_file_are_bounded(tmp_path):
    """A PIE-Bench entry's prompts, blend words and image path are held to the bounds of icd edit's."""
    from icdcli.bench.pie_fixture import write_fixture

    root = tmp_path / "pie"
    write_fixture(root, 2)
    mapping = json.loads((root / "mapping_file.json").read_text())
    key = sorted(mapping)[0]
    cases = [(field, value) for field in ("original_prompt", "editing_prompt") for value in
             ("q" * LONG["prompt"], "q" * 5_000_000, *(f"a{c}cat" for c in CONTROLS))]  # fmt: skip
    cases += [("blended_word", "w" * LONG["word"]), ("blended_word", "cat\tdog"), ("blended_word", "cat\ndog")]
    cases += [("image_path", "i" * LONG["path"]), ("image_path", "a\x00b.png")]
    assert len(cases) >= 135
    runner = CliRunner()
    for field, value in cases:
        (root / "mapping_file.json").write_text(json.dumps({**mapping, key: {**mapping[key], field: value}}))
        result = runner.invoke(main, ["bench", "pie", "--root", str(root), "--json"])
        _assert_clean(result, codes=(1,))
        error = [line for line in result.stderr.splitlines() if line.startswith("Error")][0]
        assert key in error and field in error and len(error) < 400, error
        assert any(rule in error for rule in ("at most", "control character", "NUL", "a tab", "a newline"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pie"]  # no output folder: refused before any work
