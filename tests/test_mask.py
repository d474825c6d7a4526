"""`icd edit --mask`: only the white part of a mask may change. The decode keeps the latents outside it on the
inversion's path and the result takes the photo's own pixels there, so outside the mask (past the feathered edge)
the output is the photo exactly; a spec row's `mask`, the record (a rerun skips, another mask refuses), `--from`,
the pipeline API's `mask_image`, and one-line errors for masks that cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.editing.region import FEATHER_FRACTION, RegionKeeper, latent_mask, paste_outside
from icdcli.io.images import ImageInputError, load_image, load_mask

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"  # 128x128: a red circle on blue
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a green circle on a blue background"]
BAND = 3 * int(128 * FEATHER_FRACTION) + 2  # pixels either side of a mask's edge that the feathering may touch


def _icd(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _half_mask(path: Path, size=(128, 128), right=True) -> Path:
    mask = Image.new("L", size, 0)
    half = size[0] // 2
    mask.paste(255, (half, 0, size[0], size[1]) if right else (0, 0, half, size[1]))
    mask.save(path)
    return path


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --- the pieces -------------------------------------------------------------------------------------------------


def test_the_latent_mask_covers_every_latent_the_mask_touches():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 16, 16))  # exactly latent (1, 1) of an 8x8 grid
    grid = latent_mask(mask, (8, 8))[0, 0]
    assert grid.shape == (8, 8)
    assert float(grid[1, 1]) == 1.0 and float(grid[0, 0]) == 1.0 and float(grid[2, 2]) == 1.0  # grown by one
    assert float(grid[3, 3]) == 0.0 and float(grid[7, 0]) == 0.0


def test_the_region_keeper_holds_the_target_rows_outside_the_mask_at_the_inversions_timesteps():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1.0
    kept = {259: torch.full((1, 2, 4, 4), 5.0)}
    keeper = RegionKeeper([mask], [kept], stride=2, offset=1)  # a P2P decode: (source, target)
    latents = torch.zeros(2, 2, 4, 4)
    keeper(0, 519, latents)  # a timestep the inversion did not land on: unchanged
    assert float(latents.abs().max()) == 0.0
    keeper(1, 259, latents)
    assert float(latents[0].abs().max()) == 0.0  # the source branch is never touched
    assert torch.equal(latents[1, :, :, :2], torch.full((2, 4, 2), 5.0))  # outside: the inversion's
    assert float(latents[1, :, :, 2:].abs().max()) == 0.0  # inside: the decode's own


def test_the_paste_gives_the_photos_pixels_outside_and_the_edits_inside():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    edited = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (64, 0, 128, 96))
    pasted = np.asarray(paste_outside(photo, edited, mask))
    assert np.array_equal(pasted[:, : 64 - BAND], np.asarray(photo)[:, : 64 - BAND])
    assert np.array_equal(pasted[:, 64 + BAND :], np.asarray(edited)[:, 64 + BAND :])


def test_masks_read_transparency_as_black_and_fit_the_photo(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # painted on a transparent layer
    rgba.paste((255, 255, 255, 255), (0, 0, 32, 64))
    rgba.save(tmp_path / "layer.png")
    mask = np.asarray(load_mask(tmp_path / "layer.png", (128, 128)))
    assert mask.shape == (128, 128)
    assert mask[:, :60].min() == 255 and mask[:, 68:].max() == 0

    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    with pytest.raises(ImageInputError, match=r"the mask is 64x32, the photo 128x128; give a mask of the photo's"):
        load_mask(tmp_path / "wide.png", (128, 128))
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")
    Image.new("P", (64, 64), 0).save(tmp_path / "palette.png")
    for name in ("black.png", "palette.png"):
        with pytest.raises(ImageInputError, match=rf"^\S*{name}: the mask is black all over, so nothing may change"):
            load_mask(tmp_path / name, (128, 128))


# --- icd edit --mask --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["swap", "p2p"])
def test_outside_the_mask_the_edit_is_the_photo_exactly(tmp_path, method):
    mask = _half_mask(tmp_path / "right.png")
    out = tmp_path / "edit.png"
    result = _icd("edit", EXAMPLE, *PROMPTS, "--mask", mask, "-o", out, "--method", method, "--backend", "torch")
    assert result.exit_code == 0, result.output
    photo, edited = _pixels(EXAMPLE), _pixels(out)
    assert np.array_equal(edited[:, : 64 - BAND], photo[:, : 64 - BAND])
    unmasked = tmp_path / "whole.png"
    assert _icd("edit", EXAMPLE, *PROMPTS, "-o", unmasked, "--method", method, "--backend", "torch").exit_code == 0
    whole = _pixels(unmasked)
    assert np.abs(whole[:, : 64 - BAND] - photo[:, : 64 - BAND]).mean() > 2.0  # without it, that side changes
    assert np.abs(edited[:, 64 + BAND :] - photo[:, 64 + BAND :]).mean() > 2.0  # the masked side is edited
    record = json.loads(Image.open(out).text["icd"])
    assert record["mask"] == "right.png" and record["mask_sha256"].startswith("sha256:")


@pytest.mark.slow
def test_the_record_keeps_the_mask_for_reruns_and_from(tmp_path):
    right, left = _half_mask(tmp_path / "right.png"), _half_mask(tmp_path / "left.png", right=False)
    photo = tmp_path / "photo.png"
    photo.write_bytes(EXAMPLE.read_bytes())
    args = ["edit", photo, *PROMPTS, "--backend", "torch"]
    assert _icd(*args, "--mask", right).exit_code == 0
    again = _icd(*args, "--mask", right)
    assert again.exit_code == 0 and "already made" in again.output
    other = _icd(*args, "--mask", left)
    assert other.exit_code != 0 and "mask_sha256" in other.output and "--overwrite" in other.output
    assert _icd(*args).exit_code != 0  # the same edit without the mask is another edit too
    replay = tmp_path / "replay.png"
    assert _icd("edit", "--from", tmp_path / "photo-edit.png", "-o", replay, "--backend", "torch").exit_code == 0
    assert np.array_equal(_pixels(replay), _pixels(tmp_path / "photo-edit.png"))
    right.unlink()
    gone = _icd("edit", "--from", tmp_path / "photo-edit.png", "-o", tmp_path / "r2.png", "--backend", "torch")
    assert gone.exit_code != 0 and "its mask" in gone.output and "is not there" in gone.output


@pytest.mark.slow
def test_a_spec_rows_mask_and_one_line_errors(tmp_path):
    _half_mask(tmp_path / "right.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    (tmp_path / "photo.png").write_bytes(EXAMPLE.read_bytes())
    rows = [
        {"image": "photo.png", "src": PROMPTS[1], "tgt": PROMPTS[3], "mask": "right.png", "output": "a.png"},
        {"image": "photo.png", "src": PROMPTS[1], "tgt": PROMPTS[3], "mask": "wide.png", "output": "b.png"},
        {"image": "photo.png", "src": PROMPTS[1], "tgt": PROMPTS[3], "mask": "gone.png", "output": "c.png"},
    ]
    spec = tmp_path / "edits.jsonl"
    spec.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = _icd("edit", "--spec", spec, "-o", tmp_path / "out", "--backend", "torch")
    assert result.exit_code != 0
    assert (tmp_path / "out" / "a.png").is_file() and not (tmp_path / "out" / "b.png").exists()
    assert "the mask is 64x32, the photo" in result.output and "mask " in result.output
    assert "gone.png: no such file" in result.output and "Traceback" not in result.output
    edited = _pixels(tmp_path / "out" / "a.png")
    assert np.array_equal(edited[:, : 64 - BAND], _pixels(EXAMPLE)[:, : 64 - BAND])


@pytest.mark.slow
def test_a_large_jpeg_read_reduced_keeps_its_full_size_pixels_outside_the_mask(tmp_path):
    big = Image.open(EXAMPLE).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)  # the embedded model works at 32 px: this one is read at 1/4 scale
    mask = _half_mask(tmp_path / "right.png", (512, 512))
    out = tmp_path / "big-edit.png"
    result = _icd("edit", tmp_path / "big.jpg", *PROMPTS, "--mask", mask, "-o", out, "--backend", "torch")
    assert result.exit_code == 0, result.output
    band = 3 * int(512 * FEATHER_FRACTION) + 2
    full = np.asarray(load_image(tmp_path / "big.jpg"), dtype=np.int16)
    assert np.array_equal(_pixels(out)[:, : 256 - band], full[:, : 256 - band])


@pytest.fixture(scope="module")
def masked_by_command(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A mask and the pixels `icd edit --mask` makes of the example with it (PyTorch)."""
    folder = tmp_path_factory.mktemp("by-command")
    mask, out = _half_mask(folder / "right.png"), folder / "edit.png"
    assert _icd("edit", EXAMPLE, *PROMPTS, "--mask", mask, "-o", out, "--backend", "torch").exit_code == 0
    return mask, _pixels(out)


@pytest.fixture(scope="module")
def pipe():
    from icdcli import ICDEditPipeline

    return ICDEditPipeline.from_pretrained(backend="torch")


@pytest.mark.slow
def test_the_pipeline_api_masks_as_the_command_does(masked_by_command, pipe):
    mask, by_command = masked_by_command
    edited = pipe(Image.open(EXAMPLE), PROMPTS[1], PROMPTS[3], mask_image=Image.open(mask))[0]
    assert np.array_equal(np.asarray(edited, dtype=np.int16), by_command)
    with pytest.raises(ValueError, match="mask_image has 2 masks for 1 images"):
        pipe(Image.open(EXAMPLE), PROMPTS[1], PROMPTS[3], mask_image=[Image.open(mask)] * 2)


@pytest.mark.slow
def test_a_jobs_line_gives_its_mask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _half_mask(tmp_path / "right.png")
    (tmp_path / "photo.png").write_bytes(EXAMPLE.read_bytes())
    line = {"image": "photo.png", "src": PROMPTS[1], "tgt": PROMPTS[3], "mask": "right.png", "output": "j.png"}
    result = CliRunner().invoke(main, ["edit", "--jobs", "-", "--backend", "torch"], input=json.dumps(line) + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(tmp_path / "j.png").text["icd"])["mask"] == "right.png"
    assert np.array_equal(_pixels(tmp_path / "j.png")[:, : 64 - BAND], _pixels(EXAMPLE)[:, : 64 - BAND])


def test_an_output_onto_the_mask_is_refused_even_with_overwrite(tmp_path):
    mask = _half_mask(tmp_path / "right.png")
    before = mask.read_bytes()
    result = _icd("edit", EXAMPLE, *PROMPTS, "--mask", mask, "-o", mask, "--overwrite", "--backend", "torch")
    assert result.exit_code == 2 and "is one of the inputs" in result.output
    (tmp_path / "photo.png").write_bytes(EXAMPLE.read_bytes())
    row = {"image": "photo.png", "src": PROMPTS[1], "tgt": PROMPTS[3], "mask": "right.png", "output": "right.png"}
    (tmp_path / "edits.jsonl").write_text(json.dumps(row) + "\n")
    result = _icd("edit", "--spec", tmp_path / "edits.jsonl", "--overwrite", "--backend", "torch")
    assert result.exit_code == 1 and "is an input" in result.output
    assert mask.read_bytes() == before


@pytest.mark.slow
def test_invert_once_then_masked_edits_give_the_whole_calls_pixels(tmp_path, pipe):
    mask = Image.open(_half_mask(tmp_path / "right.png"))
    photo = Image.open(EXAMPLE)
    inversion = pipe.invert(photo, PROMPTS[1])
    for method in ("swap", "p2p"):
        whole = pipe(photo, PROMPTS[1], PROMPTS[3], method=method, mask_image=mask)[0]
        decoded = pipe.edit(inversion, PROMPTS[3], method=method, mask_image=mask)[0]
        assert np.array_equal(np.asarray(decoded), np.asarray(whole)), method


@pytest.mark.slow
def test_a_saved_inversion_edited_with_a_mask_is_the_whole_masked_edit(tmp_path):
    mask = _half_mask(tmp_path / "right.png")
    photo = tmp_path / "photo.png"
    photo.write_bytes(EXAMPLE.read_bytes())
    assert _icd("invert", photo, "--prompt", PROMPTS[1], "--backend", "torch").exit_code == 0
    whole, decoded = tmp_path / "whole.png", tmp_path / "decoded.png"
    assert _icd("edit", photo, *PROMPTS, "--mask", mask, "-o", whole, "--backend", "torch").exit_code == 0
    latents = ["edit", "--latents", tmp_path / "photo.latent.safetensors", "--tgt", PROMPTS[3], "--mask", mask]
    result = _icd(*latents, "-o", decoded, "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(decoded), _pixels(whole))
    assert json.loads(Image.open(decoded).text["icd"])["mask"] == "right.png"
    onto = _icd(*latents, "-o", mask, "--backend", "torch")
    assert onto.exit_code == 2 and "is the mask" in onto.output
    photo.unlink()  # without the photo, outside the mask is the VAE's rendering, and a note says so
    result = _icd(*latents, "-o", tmp_path / "vae.png", "--backend", "torch")
    assert result.exit_code == 0 and "is not there as it was inverted" in result.output


@pytest.mark.slow
def test_edit_many_takes_a_mask_as_the_command_does(tmp_path, masked_by_command, pipe):
    mask, by_command = masked_by_command
    local = tmp_path / "right.png"
    local.write_bytes(mask.read_bytes())
    made = pipe.edit_many(EXAMPLE, PROMPTS[1], PROMPTS[3], output=tmp_path / "api.png", mask=local)
    assert made.done == 1 and np.array_equal(_pixels(tmp_path / "api.png"), by_command)
    assert json.loads(Image.open(tmp_path / "api.png").text["icd"])["mask"] == "right.png"
