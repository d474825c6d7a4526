"""Hundreds of malformed and unusual images through one `icd edit` batch: each gives a clean result."""

import io
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from icdcli.cli import main

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
