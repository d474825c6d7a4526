import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icdcli.io.images import (
    ImageInputError,
    atomic_path,
    fit_size,
    image_to_tensor,
    load_image,
    photo_rgb,
    save_image,
    tensor_to_image,
)


def _gradient(width=40, height=24):
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    return np.stack([x, x[:, ::-1], np.full_like(x, 90)], axis=-1)


@pytest.mark.parametrize(
    ("width", "height", "native", "multiple", "expected"),
    [(512, 512, 512, 64, (512, 512)), (1024, 768, 512, 64, (576, 448)), (3000, 1000, 512, 64, (896, 320)),
     (10, 2000, 512, 64, (64, 4096)), (1920, 1080, 1024, 64, (1344, 768)), (40, 24, 32, 16, (48, 32))],
)  # fmt: skip
def test_fit_size_keeps_area_aspect_and_multiples(width, height, native, multiple, expected):
    fitted = fit_size(width, height, native_size=native, multiple=multiple)
    assert fitted == expected
    assert fitted[0] % multiple == 0 and fitted[1] % multiple == 0


def test_modes_become_rgb(tmp_path):
    rgb = Image.fromarray(_gradient())
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "la.png": rgb.convert("LA"),
        "bw.png": rgb.convert("1"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (40, 24), name


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    array = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded.min() == 0 and loaded.max() == 255 and len(np.unique(loaded[..., 0])) > 200


def test_transparency_is_composited_over_white(tmp_path):
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(_gradient(40, 24))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (24, 40)


def _p3_to_srgb(rgb, gamma=2.2):
    """Display P3 pixels (with the test profile's gamma) in sRGB, by the colour spaces' published matrices (D65)."""
    p3_to_xyz = np.array([[0.4866, 0.2657, 0.1982], [0.2290, 0.6917, 0.0793], [0.0, 0.0451, 1.0439]])
    xyz_to_srgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    linear = np.clip(xyz_to_srgb @ p3_to_xyz @ ((np.asarray(rgb) / 255.0) ** gamma), 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255.0


P3_COLOURS = [(128, 64, 32), (40, 160, 220), (230, 30, 90), (100, 200, 50)]


def _swatches(colours, side=16):
    return Image.fromarray(np.concatenate([np.full((side, side, 3), c, np.uint8) for c in colours], axis=1))


def test_a_wide_gamut_photo_is_read_in_srgb(tmp_path):
    from icc import display_p3

    _swatches(P3_COLOURS + [(128, 128, 128)]).save(tmp_path / "p3.png", icc_profile=display_p3())
    loaded = np.asarray(load_image(tmp_path / "p3.png"), dtype=np.float64)
    for index, colour in enumerate(P3_COLOURS):
        got = loaded[8, 16 * index + 8]
        assert np.abs(got - _p3_to_srgb(colour)).max() <= 2.0, (colour, got)
        assert np.abs(got - colour).max() >= 8  # read raw, the colour would have been wrong by this much
    grey = loaded[8, 16 * len(P3_COLOURS) + 8]
    assert np.ptp(grey) <= 1  # both spaces share D65: a grey stays grey


def test_srgb_profiles_and_unusable_ones_leave_the_pixels_as_they_are(tmp_path, caplog):
    from PIL import ImageCms

    pixels = _gradient(40, 24)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(pixels).save(tmp_path / "srgb.png", icc_profile=srgb)
    Image.fromarray(pixels).save(tmp_path / "damaged.png", icc_profile=b"not a colour profile at all" * 8)
    assert np.array_equal(np.asarray(load_image(tmp_path / "srgb.png")), pixels)
    with caplog.at_level("WARNING", logger="icd"):
        assert np.array_equal(np.asarray(load_image(tmp_path / "damaged.png")), pixels)
    assert "damaged.png: its colour profile cannot be used" in caplog.text


def test_images_given_in_memory_get_their_profile_applied_as_files_do(tmp_path):
    from icc import display_p3

    image = _swatches(P3_COLOURS)
    image.save(tmp_path / "p3.png", icc_profile=display_p3())
    image.info["icc_profile"] = display_p3()
    assert np.array_equal(np.asarray(photo_rgb(image)), np.asarray(load_image(tmp_path / "p3.png")))
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    assert np.asarray(photo_rgb(rgba)).min() == 255  # transparency over white, as files have it


def test_bad_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    cases = {
        "missing.png": "no such file",
        "text.jpg": "not an image",
        "truncated.jpg": "damaged",
        "dot.png": "too small",
    }
    for name, expected in cases.items():
        with pytest.raises(ImageInputError, match=expected):
            load_image(tmp_path / name)
    with pytest.raises(ImageInputError, match="folder"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr("icdcli.io.images.MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_tensor_round_trip_is_lossless_at_same_size():
    image = Image.fromarray(_gradient())
    tensor = image_to_tensor(image, image.size)
    assert tensor.shape == (1, 3, 24, 40) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), np.asarray(image))


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    save_image(Image.fromarray(_gradient()), target, text={"icd": "{}"})
    assert Image.open(target).text["icd"] == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_records_travel_in_png_text_jpeg_comments_and_webp_xmp(tmp_path):
    from icdcli.io.images import read_record

    image = Image.fromarray(_gradient())
    for name in ("out.png", "out.jpg", "out.webp"):
        save_image(image, tmp_path / name, text={"icd": '{"seed": 3}'})
        assert read_record(tmp_path / name) == {"seed": 3}
    image.save(tmp_path / "plain.webp")
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert read_record(tmp_path / "plain.webp") is None and read_record(tmp_path / "junk.png") is None


def test_atomic_writes_leave_ordinary_file_permissions(tmp_path):
    import os

    from icdcli.io.atomic import atomic_path

    target = tmp_path / "out.png"
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.slow
def test_outputs_carry_a1111_parameters_and_relative_inputs(tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.main import main
    from icdcli.io.images import read_record
    from icdcli.models.sources import DEFAULT_MODEL_DIR

    example = DEFAULT_MODEL_DIR.parent.parent / "examples" / "red-circle.png"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "red.png").write_bytes(example.read_bytes())
    (tmp_path / "edited").mkdir()
    out = tmp_path / "edited" / "red-edit.png"
    args = ["edit", str(photos / "red.png"), "--src", "a red circle on a blue background",
            "--tgt", "a yellow circle on a blue background", "-o", str(out), "--seed", "3"]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0
    text = Image.open(out).text
    prompt, details = text["parameters"].split("\n")
    assert prompt == "a yellow circle on a blue background"
    assert details.startswith("Steps: 4, Sampler: iCD, CFG scale: 4.0, Seed: 3, Size: 128x128, Model: ")
    # the embedded model's base is a diffusers folder, not one file: no checkpoint hash that a reader could resolve
    # (icd's own hash stays in the icd record); its LoRAs by name and AutoV2 hash (sha256 of the file, 10 digits)
    assert "Model hash" not in details and read_record(out)["model_hash"].startswith("sha256:")
    loras = [f"{path.stem}: {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}"
             for path in (DEFAULT_MODEL_DIR / "forward-19-259-519-779.safetensors",
                          DEFAULT_MODEL_DIR / "reverse-259-519-779-999.safetensors")]  # fmt: skip
    assert details.endswith(f'Lora hashes: "{", ".join(loras)}"'), details
    assert 'Source prompt: "a red circle on a blue background"' not in details  # no comma, no quotes needed
    assert "Source prompt: a red circle on a blue background" in details and "Edit method: p2p" in details
    assert read_record(out)["input"] == "../photos/red.png"
    # the tree moves as a whole: --from still finds the input through the relative path
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    again = CliRunner().invoke(main, ["edit", "--from", str(moved / "edited" / "red-edit.png"), "-o",
                                      str(moved / "again.png")])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert np.array_equal(
        np.asarray(Image.open(moved / "again.png")), np.asarray(Image.open(moved / "edited" / "red-edit.png"))
    )


def _photo_with_exif(path, orientation=6):
    image = Image.fromarray(_gradient(64, 32))
    exif = image.getexif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Test Camera Co", "Model 7", "2026:12:07 10:00:00"
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return path


@pytest.mark.slow
def test_keep_exif_copies_the_inputs_exif_upright(tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.main import main

    photo = _photo_with_exif(tmp_path / "photo.jpg")
    prompts = ["--src", "a red circle on a blue background", "--tgt", "a green circle on a blue background"]
    for name in ("kept.png", "kept.jpg", "kept.webp"):
        result = CliRunner().invoke(main, ["edit", str(photo), *prompts, "-o", str(tmp_path / name), "--keep-exif",
                                           "--backend", "torch"])  # fmt: skip
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as out:
            exif = out.getexif()
            assert out.size == (32, 64)  # turned as the EXIF said, once: the copied orientation is upright
        assert exif[0x010F] == "Test Camera Co" and exif[0x0132] == "2026:12:07 10:00:00" and exif[0x0112] == 1
    plain = tmp_path / "plain.png"
    result = CliRunner().invoke(main, ["edit", str(photo), *prompts, "-o", str(plain), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert not Image.open(plain).getexif()


def _heic(path, image, **options):
    pillow_heif = pytest.importorskip("pillow_heif", reason='HEIF needs pillow-heif: pip install -e ".[test]"')
    pillow_heif.register_heif_opener()
    image.save(path, format="HEIF", quality=95, **options)
    return path


def test_heic_photos_are_read_by_name_or_by_header(tmp_path):
    example = Image.open(Path(__file__).parent.parent / "examples" / "red-circle.png").convert("RGB")
    photo = _heic(tmp_path / "photo.heic", example)
    loaded = np.asarray(load_image(photo), dtype=np.int16)
    assert loaded.shape == (128, 128, 3) and np.abs(loaded - np.asarray(example, dtype=np.int16)).mean() < 4
    upload = tmp_path / "upload"  # no suffix, as icd serve keeps an upload: found by its ftyp brand
    upload.write_bytes(photo.read_bytes())
    assert np.array_equal(np.asarray(load_image(upload)), np.asarray(load_image(photo)))
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    turned = _heic(tmp_path / "turned.heic", Image.fromarray(_gradient(64, 32)), exif=exif.tobytes())
    assert load_image(turned).size == (32, 64)  # turned once, as displayed


def test_heic_without_pillow_heif_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    import icdcli.io.images as images

    photo = tmp_path / "photo.heic"
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    monkeypatch.setattr(images, "_heif_opener", lambda: False)
    with pytest.raises(ImageInputError, match=r"photo.heic: a HEIF \(HEIC\) photo; reading it needs pillow-heif: pip"):
        load_image(photo)


def _nclx(primaries, transfer):
    return {"color_primaries": primaries, "transfer_characteristics": transfer, "matrix_coefficients": 6,
            "full_range_flag": 1}  # fmt: skip


def test_a_heic_whose_nclx_box_states_display_p3_is_read_in_srgb(tmp_path):
    """Phones' HEIF photos often state their colour space by code points (an nclx box), with no ICC profile."""
    photo = _heic(tmp_path / "p3.heic", _swatches(P3_COLOURS + [(128, 128, 128)]), nclx_profile=_nclx(12, 4))
    raw = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float64)  # Pillow leaves the pixels as stored
    loaded = np.asarray(load_image(photo), dtype=np.float64)
    for index, colour in enumerate(P3_COLOURS):
        stored, got = raw[8, 16 * index + 8], loaded[8, 16 * index + 8]
        assert np.abs(got - _p3_to_srgb(stored, gamma=2.2)).max() <= 1.0, (colour, stored, got)
        assert np.abs(got - stored).max() >= 8  # read raw, the colour would have been wrong by this much
    grey = loaded[8, 16 * len(P3_COLOURS) + 8]
    assert np.ptp(grey) <= 1


@pytest.mark.parametrize("primaries, transfer, warns", [(1, 13, None), (2, 2, None), (9, 16, "an HDR (PQ) photo")])
def test_heic_nclx_boxes_in_srgb_or_hdr_leave_the_pixels_as_they_are(tmp_path, caplog, primaries, transfer, warns):
    photo = _heic(tmp_path / "photo.heic", _swatches(P3_COLOURS), nclx_profile=_nclx(primaries, transfer))
    with caplog.at_level("WARNING", logger="icd"):
        loaded = load_image(photo)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(photo).convert("RGB")))
    assert (warns in caplog.text) if warns else "colour" not in caplog.text


def test_the_nclx_matrix_is_the_published_display_p3_to_srgb_one():
    from icdcli.io.nclx import SRGB_PRIMARIES, to_srgb_matrix

    published = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])
    display_p3 = (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, 0.3127, 0.3290)
    assert np.abs(to_srgb_matrix(display_p3) - published).max() < 2e-3
    assert np.allclose(to_srgb_matrix(SRGB_PRIMARIES), np.eye(3), atol=1e-9)
    dci_white = (*display_p3[:6], 0.314, 0.351)  # DCI-P3's white: adapted to D65, so white stays white
    assert np.allclose(to_srgb_matrix(dci_white) @ np.ones(3), np.ones(3), rtol=1e-6)


@pytest.mark.slow
def test_icd_edit_takes_a_heic_photo_and_a_folder_of_them(tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.main import main

    example = Image.open(Path(__file__).parent.parent / "examples" / "red-circle.png").convert("RGB")
    (tmp_path / "photos").mkdir()
    _heic(tmp_path / "photos" / "a.heic", example)
    prompts = ["--src", "a red circle on a blue background", "--tgt", "a green circle on a blue background"]
    result = CliRunner().invoke(main, ["edit", str(tmp_path / "photos"), *prompts, "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "photos" / "a-edit.png").size == (128, 128)
