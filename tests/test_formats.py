"""`icd edit --format jpg|webp --quality Q`: outputs in a lossy format, each still carrying the edit's record (a JPEG
in its comment, a WebP in an XMP packet), so reruns skip them, folder runs leave them out of the inputs and `--from`
repeats them."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.io.images import read_record, save_image

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]


def _icd(*args: object, stdin: str | None = None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=stdin)


def _photo(folder: Path) -> Path:
    photo = folder / "photo.png"
    shutil.copy(EXAMPLE, photo)
    return photo


def _noise(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp"])
def test_every_output_format_carries_the_record(tmp_path, suffix):
    record = {"src": 'a <b>cat</b> & a "dog"', "tgt": "&amp; stays &amp;", "seed": 3}
    path = save_image(_noise(), tmp_path / f"out{suffix}", text={"icd": json.dumps(record)})
    assert read_record(path) == record


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_quality_sets_the_lossy_formats_size(tmp_path, suffix):
    low = save_image(_noise(), tmp_path / f"low{suffix}", quality=20)
    high = save_image(_noise(), tmp_path / f"high{suffix}", quality=95)
    assert low.stat().st_size < 0.7 * high.stat().st_size


def test_a_webp_without_icds_record_has_none(tmp_path):
    _noise().save(tmp_path / "plain.webp")
    _noise().save(tmp_path / "other.webp", xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/">no record</x:xmpmeta>')
    assert read_record(tmp_path / "plain.webp") is None and read_record(tmp_path / "other.webp") is None


@pytest.mark.parametrize(("fmt", "magic"), [("jpg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_format_names_the_outputs_and_a_rerun_skips_them(tmp_path, fmt, magic):
    photo = _photo(tmp_path)
    result = _icd("edit", photo, *PROMPTS, "--format", fmt, "--quality", 80, "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / f"photo-edit.{fmt}"
    assert out.read_bytes().startswith(magic)
    assert read_record(out)["tgt"] == PROMPTS[3]
    again = _icd("edit", photo, *PROMPTS, "--format", fmt, "--quality", 80, "--json")
    assert json.loads(again.output.splitlines()[0])["status"] == "skipped"
    # a folder run leaves icd's own outputs out of its inputs, whatever their format
    folder = _icd("edit", tmp_path, *PROMPTS, "--format", fmt, "--quality", 80, "--json")
    assert folder.exit_code == 0, folder.output
    lines = [json.loads(line) for line in folder.output.splitlines() if line.startswith("{")]
    assert [Path(line["input"]).name for line in lines if "input" in line] == ["photo.png"]
    photo.unlink()  # a folder of icd's outputs only: nothing to edit, and it says why
    only_outputs = _icd("edit", tmp_path, *PROMPTS, "--format", fmt)
    assert only_outputs.exit_code == 1, only_outputs.output
    assert "nothing to edit: the image file found is an output of icd, which folders leave out" in only_outputs.stderr
    shutil.copy(EXAMPLE, photo)
    # --from repeats the edit a lossy output records
    repeated = _icd("edit", "--from", out, "-o", tmp_path / "again.png")
    assert repeated.exit_code == 0, repeated.output
    assert read_record(tmp_path / "again.png")["tgt"] == PROMPTS[3]
    into = _icd("edit", "--from", out, "-o", f"{tmp_path / 'again'}/")  # a name icd gives: the --from file's format
    assert into.exit_code == 0, into.output
    assert [path.name for path in (tmp_path / "again").iterdir()] == [f"photo-edit.{fmt}"]


def test_format_reaches_stdout_saved_inversions_and_jobs(tmp_path):
    photo = _photo(tmp_path)
    piped = CliRunner().invoke(main, ["edit", str(photo), *PROMPTS, "--format", "jpg", "-o", "-"])
    assert piped.exit_code == 0 and piped.stdout_bytes.startswith(b"\xff\xd8\xff"), piped.output
    assert Image.open(io.BytesIO(piped.stdout_bytes)).size == (128, 128)
    assert _icd("invert", photo, "--prompt", PROMPTS[1]).exit_code == 0
    latents = _icd("edit", "--latents", tmp_path / "photo.latent.safetensors", "--tgt", PROMPTS[3], "--format", "webp")
    assert latents.exit_code == 0, latents.output
    assert read_record(tmp_path / "photo-edit.webp")["latents"] == "photo.latent.safetensors"
    line = json.dumps({"image": str(photo), "src": PROMPTS[1], "tgt": PROMPTS[3]})
    (tmp_path / "jobs").mkdir()
    jobs = _icd("edit", "--jobs", "-", "--format", "jpg", "-o", tmp_path / "jobs", stdin=line + "\n")
    assert jobs.exit_code == 0, jobs.output
    assert (tmp_path / "jobs" / "photo-edit.jpg").is_file()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--format", "png", "-o", "x.jpg"], "-o x.jpg and --format png disagree"),
        (["--quality", "80"], "--quality sets JPEG and WebP quality"),
        (["--format", "png", "--quality", "80"], "PNG outputs are lossless"),
        (["--tgt", "a green circle", "--quality", "80"], "PNG outputs are lossless"),  # several targets: PNGs
        (["--format", "gif"], "Invalid value for '--format'"),
        (["--format", "jpg", "--quality", "0"], "--quality"),
    ],
)
def test_formats_one_line_errors(tmp_path, extra, says):
    result = _icd("edit", _photo(tmp_path), *PROMPTS, *extra)
    assert result.exit_code == 2 and says in result.output, result.output
    assert not list(tmp_path.glob("photo-edit*"))


def test_quality_with_an_output_file_of_a_lossy_format(tmp_path):
    result = _icd("edit", _photo(tmp_path), *PROMPTS, "--quality", 30, "-o", tmp_path / "small.jpg")
    assert result.exit_code == 0, result.output
    default = _icd("edit", _photo(tmp_path), *PROMPTS, "-o", tmp_path / "default.jpg")
    assert default.exit_code == 0, default.output
    assert (tmp_path / "small.jpg").stat().st_size < (tmp_path / "default.jpg").stat().st_size


def test_the_pipelines_edit_many_writes_the_format_the_command_line_does(tmp_path):
    from icdcli import ICDEditPipeline

    photo = _photo(tmp_path)
    pipe = ICDEditPipeline.from_pretrained(device="cpu", backend="torch")
    done = pipe.edit_many(photo, PROMPTS[1], PROMPTS[3], output_format="webp", quality=60)
    assert done.done == 1 and (tmp_path / "photo-edit.webp").read_bytes().startswith(b"RIFF")
    again = _icd("edit", photo, *PROMPTS, "--format", "webp", "--quality", 60, "--backend", "torch", "--json")
    assert json.loads(again.output.splitlines()[0])["status"] == "skipped"  # the same edit, found made
    with pytest.raises(ValueError, match="png, jpg or webp"):
        pipe.edit_many(photo, PROMPTS[1], PROMPTS[3], output_format="gif")
    with pytest.raises(ValueError, match="quality"):
        pipe.edit_many(photo, PROMPTS[1], PROMPTS[3], output_format="jpg", quality=0)


def test_a_photo_longer_than_a_format_allows_fails_before_its_edit_and_in_the_dry_run(tmp_path):
    from icdcli.io.images import format_problem

    assert format_problem((16, 16383), Path("a.webp")) is None and format_problem((16, 65500), Path("a.jpeg")) is None
    assert "at most 16,383 pixels a side" in format_problem((16, 16384), Path("a.webp"))
    assert "at most 65,500 pixels a side" in format_problem((65501, 16), Path("a.jpg"))
    assert format_problem((16, 100_000), Path("a.png")) is None
    tall = tmp_path / "tall.png"
    Image.new("RGB", (16, 17000), (200, 30, 30)).save(tall)
    for extra in (["--dry-run"], []):
        result = _icd("edit", tall, *PROMPTS, "--format", "webp", *extra)
        assert result.exit_code == 1 and "16x17000 pixels cannot be written as WEBP" in result.stderr, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tall.png"]


def test_quality_and_keep_exif_are_recorded_so_a_rerun_with_other_ones_is_refused_and_from_repeats_them(tmp_path):
    photo = _photo(tmp_path)
    out = tmp_path / "photo-edit.webp"
    assert _icd("edit", photo, *PROMPTS, "--format", "webp").exit_code == 0
    assert "quality" not in read_record(out) and "keep_exif" not in read_record(out)  # the defaults: as before
    same = _icd("edit", photo, *PROMPTS, "--format", "webp", "--quality", 90)  # WebP's default quality
    assert same.exit_code == 0 and "skipped" in same.stderr, same.output
    for extra, says in ((["--quality", 50], "quality None -> 50"), (["--keep-exif"], "keep_exif None -> True")):
        other = _icd("edit", photo, *PROMPTS, "--format", "webp", *extra)
        assert other.exit_code == 1 and f"exists with other parameters ({says})" in other.stderr, other.output
    made = _icd("edit", photo, *PROMPTS, "--format", "webp", "--quality", 50, "--keep-exif", "--overwrite")
    assert made.exit_code == 0, made.output
    assert read_record(out)["quality"] == 50 and read_record(out)["keep_exif"] is True
    repeated = _icd("edit", "--from", out, "-o", f"{tmp_path / 'again'}/")
    assert repeated.exit_code == 0, repeated.output
    again = read_record(tmp_path / "again" / "photo-edit.webp")
    assert again["quality"] == 50 and again["keep_exif"] is True
    with Image.open(out) as first, Image.open(tmp_path / "again" / "photo-edit.webp") as second:
        assert np.array_equal(np.asarray(first), np.asarray(second))  # encoded at the recorded quality
