"""The PIE-Bench-format runner: RLE masks, the mapping file, metrics on known pairs, the fixture, the command."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from icdcli.bench.pie_fixture import write_fixture
from icdcli.cli.bench_pie import pie
from icdcli.core.errors import ICDError
from icdcli.io.images import read_record
from icdcli.pie.dataset import (
    PieFormatError,
    decode_mask,
    encode_mask,
    output_path,
    parse_types,
    read_mapping,
    select_items,
)
from icdcli.pie.networks import load_clip, load_dino, load_lpips, lpips_network
from icdcli.pie.report import markdown_tables
from icdcli.pie.scoring import background_metrics, lpips_background, summarise
from icdcli.training.scenes import change_mask, scene_at

DEFAULT_TOKENIZER = Path(__file__).parent.parent / "icdcli" / "default_model" / "pipeline" / "tokenizer"

# --- RLE masks ----------------------------------------------------------------------------------------


def test_decode_marks_the_runs_row_major_and_the_border():
    # 4 rows x 5 columns: flat 6, 7 -> (1, 1), (1, 2); flat 12 -> (2, 2)
    inner = decode_mask([6, 2, 12, 1], 4, 5, border=False)
    expected = np.zeros((4, 5), dtype=bool)
    expected[1, 1] = expected[1, 2] = expected[2, 2] = True
    assert (inner == expected).all()
    framed = decode_mask([6, 2, 12, 1], 4, 5)
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True
    assert (framed == expected).all()
    assert framed.sum() == 14 + 3  # the 14 border pixels of a 4x5 image and the 3 inside


def test_decode_clips_runs_that_overflow_and_ignores_runs_past_the_end():
    mask = decode_mask([18, 10, 40, 3], 4, 5, border=False)  # 20 pixels: the first run keeps 18, 19
    assert np.flatnonzero(mask.ravel()).tolist() == [18, 19]
    assert decode_mask([], 4, 5, border=False).sum() == 0


def test_decode_at_the_benchmarks_512_size():
    mask = decode_mask([512 * 3 + 10, 5], 512, 512)
    assert mask[3, 10:15].all() and not mask[3, 15] and not mask[3, 9]
    assert mask[1:-1, 1:-1].sum() == 5 and mask[0].all() and mask[:, -1].all()


@pytest.mark.parametrize("encoded", [[1, 2, 3], [-1, 2], [3, -2]])
def test_decode_refuses_malformed_rle(encoded):
    with pytest.raises(ValueError):
        decode_mask(encoded, 4, 5)


def test_encode_is_the_inverse_of_decode():
    assert encode_mask(np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)) == [1, 3]
    assert encode_mask(np.ones((2, 2), dtype=bool)) == [0, 4]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 9)) < 0.4
        assert (decode_mask(encode_mask(mask), 7, 9, border=False) == mask).all()


# --- the mapping file -----------------------------------------------------------------------------------


def _write_mapping(root: Path, mapping: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


ENTRY = {
    "image_path": "0_random_140/000000000000.jpg",
    "original_prompt": "a cat sitting on a wooden chair",
    "editing_prompt": "a [dog] sitting on a wooden chair",
    "editing_instruction": "Make the cat a dog",
    "editing_type_id": "0",
    "blended_word": "cat dog",
    "mask": [10, 3],
}


def test_mapping_items_strip_brackets_and_give_the_blend_words(tmp_path):
    other = {**ENTRY, "editing_type_id": "9", "blended_word": "", "image_path": "9/x.jpg"}
    root = _write_mapping(tmp_path / "pie", {"900000000001": other, "000000000000": ENTRY})
    items = read_mapping(root)
    assert [item.key for item in items] == ["000000000000", "900000000001"]
    assert items[0].target_prompt == "a dog sitting on a wooden chair"
    assert items[0].source_prompt == ENTRY["original_prompt"]
    assert items[0].blend == ("cat", "dog") and items[1].blend is None
    assert [i.key for i in select_items(items, parse_types(["9"]), None)] == ["900000000001"]
    assert parse_types(["0,6", "8"]) == {"0", "6", "8"} and parse_types([]) is None
    with pytest.raises(ValueError, match="0..9"):
        parse_types(["11"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask": [1, 2, 3]}, "mask"),
        ({"editing_type_id": "12"}, "editing_type_id"),
        ({"image_path": "../outside.jpg"}, "relative"),
        ({"editing_prompt": ""}, "editing_prompt"),
    ],
)
def test_mapping_errors_name_the_item_and_field(tmp_path, change, message):
    root = _write_mapping(tmp_path / "pie", {"000000000000": {**ENTRY, **change}})
    with pytest.raises(PieFormatError, match=message) as caught:
        read_mapping(root)
    assert "000000000000" in str(caught.value)


def test_a_folder_without_a_mapping_file_is_refused(tmp_path):
    with pytest.raises(PieFormatError, match="mapping_file.json"):
        read_mapping(tmp_path)


# --- metrics on known pairs --------------------------------------------------------------------------------


def _pair(offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    source = rng.integers(20, 200, (32, 32, 3), dtype=np.uint8)
    mask = decode_mask([32 * 10 + 8, 12, 32 * 11 + 8, 12], 32, 32)
    edited = source.astype(np.int32) + offset
    edited[mask] = 255 - source[mask]  # the edited region may hold anything
    return source, edited.astype(np.uint8), mask


def test_identical_backgrounds_score_perfectly():
    source, edited, mask = _pair(0)
    scores = background_metrics(source, edited, mask)
    assert scores["psnr"] == 100.0 and scores["mse"] == 0.0 and scores["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_a_constant_offset_gives_the_exact_psnr_and_mse():
    source, edited, mask = _pair(10)
    scores = background_metrics(source, edited, mask)
    # the benchmark zeroes the edited region in both images and averages over every pixel
    kept = 1 - mask.mean()
    assert scores["mse"] == pytest.approx((10 / 255) ** 2 * kept, rel=1e-12)
    assert scores["psnr"] == pytest.approx(10 * math.log10(1 / ((10 / 255) ** 2 * kept)), rel=1e-12)


def test_background_ssim_matches_scikit_image_on_the_masked_images():
    from skimage.metrics import structural_similarity

    source, edited, mask = _pair(0)
    noisy = np.clip(edited.astype(np.int32) + np.random.default_rng(2).integers(-30, 30, edited.shape), 0, 255)
    keep = (~mask)[..., None]
    reference = structural_similarity(
        source / 255 * keep, noisy / 255 * keep, data_range=1.0, channel_axis=-1, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False,
    )  # fmt: skip
    assert background_metrics(source, noisy.astype(np.uint8), mask)["ssim"] == pytest.approx(reference, abs=1e-6)


def test_a_mask_that_covers_everything_has_no_background_score():
    source, edited, _ = _pair(0)
    everything = np.ones((32, 32), dtype=bool)
    assert background_metrics(source, edited, everything) == {"psnr": None, "mse": None, "ssim": None}


def test_summaries_average_per_type_and_leave_out_missing_values():
    rows = [
        {"key": "a", "editing_type_id": "0", "psnr": 20.0, "seconds_per_edit": 1.0},
        {"key": "b", "editing_type_id": "0", "psnr": None, "seconds_per_edit": 3.0},
        {"key": "c", "editing_type_id": "6", "psnr": 30.0, "seconds_per_edit": None},
        {"key": "d", "editing_type_id": "6", "error": "unreadable"},
    ]
    summary = summarise(rows, ["psnr"])
    assert summary["overall"] == {"n": 3, "psnr": 25.0, "seconds_per_edit": 2.0}
    assert summary["per_type"]["0"]["psnr"] == 20.0 and summary["per_type"]["6"]["n"] == 1
    table = markdown_tables(summary, ["psnr"], {"clip_whole": "no model", "clip_edited": "no model"})
    assert "| 0 | random | 2 | 20.00 | 2.000 |" in table
    assert "skipped clip_whole, clip_edited: no model" in table


# --- LPIPS, DINO, CLIP from local weights -------------------------------------------------------------------

LPIPS_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 6, 12: 7}


def _lpips_file(tmp_path: Path) -> Path:
    """Random weights under the lpips package's parameter names (net.sliceK.N..., linK.model.1.weight)."""
    torch.manual_seed(0)
    state = {}
    for key, value in lpips_network().state_dict().items():
        head, _, rest = key.partition(".")
        if head == "features":
            index, _, tail = rest.partition(".")
            key = f"net.slice{LPIPS_SLICES[int(index)]}.{index}.{tail}"
        else:
            key = f"{head}.model.1.{rest}"
        state[key] = torch.randn_like(value).abs() if head != "features" else torch.randn_like(value) * 0.1
    path = tmp_path / "lpips-squeeze.pth"
    torch.save(state, path)
    return path


def test_lpips_loads_lpips_names_and_compares_only_the_background(tmp_path):
    network = load_lpips(_lpips_file(tmp_path))
    # torchvision's squeezenet1_1 shapes: the first conv and the last Fire's 3x3 expansion
    assert network.features[0].weight.shape == (64, 3, 3, 3)
    assert network.features[12].expand3x3.weight.shape == (256, 64, 3, 3)
    source, edited, mask = _pair(0)
    assert lpips_background(network, source, edited, mask) == pytest.approx(0.0, abs=1e-12)
    _, shifted, _ = _pair(25)
    assert lpips_background(network, source, shifted, mask) > 1e-4


def test_lpips_file_without_the_heads_is_refused(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"net.slice1.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ICDError, match="--lpips"):
        load_lpips(path)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=224, patch_size=32)  # fmt: skip
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_structure_distance_is_the_mse_of_last_layer_key_self_similarities(dino_dir):
    scorer = load_dino(dino_dir)
    source, edited, _ = _pair(0)
    assert scorer(source, source) == 0.0
    assert scorer(source, edited) > 0.0
    # the same keys computed from the hidden states: the last block's input, its layer norm, its key projection
    pixels = torch.from_numpy(edited.astype(np.float32)).permute(2, 0, 1)[None]
    pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True)
    pixels = (pixels - scorer.mean) / scorer.std
    with torch.no_grad():
        hidden = scorer.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        block = scorer.model.layers[-1] if hasattr(scorer.model, "layers") else scorer.model.encoder.layer[-1]
        projection = getattr(block.attention, "k_proj", None) or block.attention.attention.key
        keys = torch.nn.functional.normalize(projection(block.layernorm_before(hidden))[0], dim=-1)
    similarity = scorer.self_similarity(edited)
    assert similarity.shape == (50, 50)  # 224/32 squared patches and the CLS token
    assert torch.allclose(similarity, keys @ keys.T, atol=1e-5)


def test_clip_score_is_100_times_the_clamped_cosine(clip_dir):
    scorer = load_clip(clip_dir)
    source, _, _ = _pair(0)
    score = scorer(source, "a red circle on a blue background")
    pixels = scorer.processor(images=[source], return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(["a red circle on a blue background"], return_tensors="pt")
    with torch.no_grad():
        image = scorer.model.visual_projection(scorer.model.vision_model(pixel_values=pixels).pooler_output)
        text = scorer.model.text_projection(scorer.model.text_model(**tokens).pooler_output)
    cosine = float(torch.nn.functional.cosine_similarity(image, text))
    assert score == pytest.approx(max(100 * cosine, 0.0), rel=1e-5, abs=1e-6)
    assert 0.0 <= score <= 100.0


def test_bad_model_folders_are_refused_with_the_flag(tmp_path):
    with pytest.raises(ICDError, match="--dino"):
        load_dino(tmp_path)
    with pytest.raises(ICDError, match="--clip"):
        load_clip(tmp_path)


# --- the fixture ------------------------------------------------------------------------------------------


def test_fixture_is_pie_bench_format_with_masks_of_the_change(tmp_path):
    mapping = write_fixture(tmp_path / "pie", 8)
    items = read_mapping(tmp_path / "pie")
    assert [item.editing_type_id for item in items] == ["0", "0", "1", "1", "6", "6", "8", "8"]
    for item in items:
        index = int(item.key[1:])
        assert item.key.startswith(item.editing_type_id) and len(item.key) == 12
        image = np.asarray(Image.open(tmp_path / "pie" / "annotation_images" / item.image_path))
        scene = scene_at("heldout", 50_000 + index)
        assert (image == scene.render(32)).all() and item.source_prompt == scene.caption()
        assert "[" in item.editing_prompt and item.target_prompt != item.source_prompt
        words = item.source_prompt.split(), item.target_prompt.split()
        changed = [b for a, b in zip(*words, strict=True) if a != b]
        assert changed == [w.strip("[]") for w in item.editing_prompt.split() if w.startswith("[")]
        assert item.blend is not None
    colour = next(item for item in items if item.editing_type_id == "6")
    target_colour = colour.target_prompt.split()[1]
    target = scene_at("heldout", 50_000 + int(colour.key[1:]))
    from dataclasses import replace

    expected = change_mask(target, replace(target, colour=target_colour))
    assert (decode_mask(list(mapping[colour.key]["mask"]), 32, 32, border=False) == expected).all()
    assert write_fixture(tmp_path / "again", 4) == {k: v for k, v in mapping.items() if int(k[1:]) < 4}


# --- the command, end to end ----------------------------------------------------------------------------------


def _invoke(args: list[str]):
    return CliRunner().invoke(pie, args, catch_exceptions=False)


@pytest.mark.slow
def test_runner_end_to_end_resumes_and_prints_json(tmp_path, dino_dir, clip_dir):
    root = tmp_path / "pie"
    write_fixture(root, 6)
    common = ["--root", str(root), "--json", "--dino", str(dino_dir), "--clip", str(clip_dir)]
    first = _invoke([*common, "--limit", "3"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["edits"]["done"] == 3 and report["edits"]["skipped"] == 0 and report["n_items"] == 3
    folder = root.parent / "output" / "icd4-swap"  # beside the data, as PIE-Bench's evaluation expects
    items = read_mapping(root)
    made = {item.key: output_path(folder, item) for item in items[:3]}
    assert all(path.is_file() for path in made.values())
    assert not output_path(folder, items[3]).exists()
    stamps = {key: os.stat(path).st_mtime_ns for key, path in made.items()}
    record = read_record(made[items[0].key])
    assert record["method"] == "swap" and record["sampler"] == "icd" and record["pie"]["key"] == items[0].key
    assert record["tgt"] == items[0].target_prompt and record["seconds"]["edit"] > 0

    second = _invoke(common)
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert report["edits"]["done"] == 3 and report["edits"]["skipped"] == 3 and report["n_items"] == 6
    assert {key: os.stat(path).st_mtime_ns for key, path in made.items()} == stamps  # not recomputed
    assert report["metrics"] == ["structure_distance", "psnr", "mse", "ssim", "clip_whole", "clip_edited"]
    assert report["skipped_metrics"] == {"lpips": report["skipped_metrics"]["lpips"]}
    overall = report["overall"]
    assert overall["n"] == 6 and 5.0 < overall["psnr"] < 60.0 and 0.0 < overall["ssim"] <= 1.0
    assert overall["structure_distance"] >= 0.0 and 0.0 <= overall["clip_edited"] <= 100.0
    assert overall["seconds_per_edit"] > 0.0
    assert sorted(report["per_type"]) == ["0", "1", "6", "8"]
    assert sum(values["n"] for values in report["per_type"].values()) == 6
    assert len(report["items"]) == 6 and report["failed"] == []
    assert json.loads((folder / "metrics.json").read_text()) == report
    assert "| 8 | change background |" in (folder / "metrics.md").read_text()

    refused = _invoke([*common, "--limit", "1", "--seed", "7"])
    assert refused.exit_code == 1
    assert "seed 0 -> 7" in refused.output and "--overwrite" in refused.output


def test_markdown_output_the_ddim_baseline_and_jpeg_items(tmp_path):
    root = tmp_path / "pie"
    mapping = write_fixture(root, 2)
    key = "100000000001"  # PIE-Bench's images are JPEGs: this one too, and its output keeps the .jpg name
    png = root / "annotation_images" / mapping[key]["image_path"]
    Image.open(png).save(png.with_suffix(".jpg"), quality=95)
    mapping[key]["image_path"] = str(Path(mapping[key]["image_path"]).with_suffix(".jpg"))
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    runs = tmp_path / "runs"
    result = _invoke(
        ["--root", str(root), "--sampler", "ddim", "--ddim-steps", "2", "--types", "1", "--out", str(runs)]
    )
    assert result.exit_code == 0, result.output
    assert "| type | edit | items | PSNR | MSE ×10⁴ | SSIM ×10² | s/edit |" in result.stdout
    assert "| 1 | change object | 1 |" in result.stdout
    assert "skipped lpips" in result.stdout and "skipped clip_whole, clip_edited" in result.stdout
    output = runs / "ddim2-swap" / "annotation_images" / mapping[key]["image_path"]
    assert output.suffix == ".jpg" and Image.open(output).format == "JPEG"
    record = read_record(output)
    assert record["sampler"] == "ddim" and record["steps"] == 2 and record["tau"] == 1.0 and record["pie"]["key"] == key


def test_bad_arguments_fail_in_one_line(tmp_path):
    root = tmp_path / "pie"
    write_fixture(root, 2)
    result = CliRunner().invoke(pie, ["--root", str(root), "--types", "2"])
    assert result.exit_code == 1 and "check --types" in result.output
    result = CliRunner().invoke(pie, ["--root", str(tmp_path)])
    assert result.exit_code == 1 and "no mapping_file.json" in result.output
    result = CliRunner().invoke(pie, ["--root", str(root), "--lpips", str(tmp_path / "absent.pth")])
    assert result.exit_code == 1 and "--lpips" in result.output


def test_p2p_runs_with_each_items_blend_words(tmp_path):
    root = tmp_path / "pie"
    write_fixture(root, 4)
    result = _invoke(["--root", str(root), "--method", "p2p", "--types", "1,6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "p2p" and report["edits"]["done"] == 2
    for item in select_items(read_mapping(root), {"1", "6"}, None):
        record = read_record(output_path(root.parent / "output" / "icd4-p2p", item))
        source_word, target_word = item.blend
        assert record["method"] == "p2p" and record["p2p"]["blend_source"] == [source_word]
        assert record["p2p"]["blend_target"] == [target_word] and record["p2p"]["blend"] == []
        assert record["p2p"]["cross_replace"] == 0.3 and record["p2p"]["self_replace"] == 0.6  # the embedded recipe


@pytest.mark.slow
def test_mask_holds_each_edit_to_its_annotated_region(tmp_path):
    root = tmp_path / "pie"
    write_fixture(root, 4)
    plain = _invoke(["--root", str(root), "--json"])
    masked = _invoke(["--root", str(root), "--json", "--mask"])
    assert plain.exit_code == 0 and masked.exit_code == 0, (plain.output, masked.output)
    plain_report, masked_report = json.loads(plain.stdout), json.loads(masked.stdout)
    assert masked_report["mask"] is True and plain_report["mask"] is False
    folder = root.parent / "output" / "icd4-swap-mask"
    assert masked_report["output"] == str(folder) and masked_report["edits"]["done"] == 4
    for item in read_mapping(root):
        record = read_record(output_path(folder, item))
        assert Path(record["mask"]).name == f"{item.key}.png" and record["mask_sha256"].startswith("sha256:")
        region = np.asarray(Image.open(folder / "masks" / f"{item.key}.png")) > 0
        assert (region == decode_mask(list(item.mask), 32, 32, border=False)).all()
        edited = np.asarray(Image.open(output_path(folder, item)).convert("RGB"))
        source = np.asarray(Image.open(root / "annotation_images" / item.image_path).convert("RGB"))
        assert (edited[~region] == source[~region]).all()  # outside the annotated region: the photo exactly
    assert masked_report["overall"]["psnr"] > plain_report["overall"]["psnr"]


def test_p2p_replays_the_releases_replace_tail_when_asked(tmp_path):
    root = tmp_path / "pie"
    write_fixture(root, 4)
    common = ["--root", str(root), "--method", "p2p", "--types", "1", "--json"]
    result = _invoke([*common, "--replace-tail", "release", "--name", "release"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replace_tail"] == "release" and report["edits"]["done"] == 1
    item = select_items(read_mapping(root), {"1"}, None)[0]
    assert read_record(output_path(root.parent / "output" / "release", item))["p2p"]["replace_tail"] == "release"
    aligned = _invoke([*common, "--name", "aligned"])
    assert aligned.exit_code == 0 and json.loads(aligned.stdout)["replace_tail"] == "aligned"
    assert "replace_tail" not in read_record(output_path(root.parent / "output" / "aligned", item))["p2p"]


def test_p2p_without_prompt_to_prompt_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "icdcli.diffusion.p2p", None
    )  # as in an icd without Prompt-to-Prompt: import fails
    root = tmp_path / "pie"
    write_fixture(root, 1)
    result = CliRunner().invoke(pie, ["--root", str(root), "--method", "p2p"])
    assert result.exit_code == 1
    assert "--method p2p needs Prompt-to-Prompt" in result.output and "--method swap" in result.output


def test_fixture_accuracy_tells_the_target_from_the_source(tmp_path):
    from icdcli.bench.pie_fixture import fixture_accuracy, target_scene

    root = tmp_path / "pie"
    write_fixture(root, 8)
    perfect, unchanged = tmp_path / "perfect", tmp_path / "unchanged"
    for item in read_mapping(root):
        source = scene_at("heldout", 50_000 + int(item.key[1:]))
        target, kind = target_scene(source, item.target_prompt)
        assert kind in {"1": ("shape",), "6": ("colour",), "8": ("background",)}.get(item.editing_type_id, (kind,))
        for folder, scene in ((perfect, target), (unchanged, source)):
            path = output_path(folder, item)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene.render(32)).save(path)
    assert fixture_accuracy(root, perfect)["overall"] == {"n": 8, "accuracy": 1.0}
    assert fixture_accuracy(root, unchanged)["overall"] == {"n": 8, "accuracy": 0.0}
    assert sorted(fixture_accuracy(root, perfect)["per_type"]) == ["0", "1", "6", "8"]


@pytest.mark.slow
def test_ctrl_c_scores_what_is_finished_and_the_rerun_does_the_rest(tmp_path):
    import signal
    import subprocess
    import time

    root = tmp_path / "pie"
    write_fixture(root, 16)
    folder = root.parent / "output" / "icd4-swap" / "annotation_images"
    # batches of 2 after the first item: Ctrl-C finishes the batch in the networks, and 15 would be all the rest
    command = [sys.executable, "-c", "from icdcli.cli.main import main; main()", "bench", "pie", "--root", str(root),
               "--json", "--batch-size", "2"]  # fmt: skip
    env = {**os.environ, "ICD_BACKEND": "torch", "OMP_NUM_THREADS": "1"}

    def made() -> list[Path]:
        return sorted(p for p in folder.rglob("*.png") if not p.name.startswith(".")) if folder.is_dir() else []

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not made():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: scoring what is finished" in stderr
    report = json.loads(stdout)
    finished = made()
    edits = report["edits"]
    assert 1 <= edits["done"] == len(finished) < 16 and edits["failed"] == 0
    assert edits["not_run"] == 16 - len(finished) and report["overall"]["n"] == len(finished)
    assert {row["key"] for row in report["items"]} == {read_record(path)["pie"]["key"] for path in finished}
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    edits = json.loads(rerun.stdout)["edits"]
    assert (edits["skipped"], edits["done"], edits["not_run"]) == (len(finished), 16 - len(finished), 0)
    assert len(made()) == 16


@pytest.mark.parametrize("name", ["../../escape", "/tmp/elsewhere", "..", "a/b"])
def test_bench_pie_name_is_a_folder_in_out_never_a_path_out_of_it(tmp_path, name):
    from icdcli.cli.main import main

    result = CliRunner().invoke(main, ["bench", "pie", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                                       "--name", name])  # fmt: skip
    assert result.exit_code == 2 and "is not a folder name" in result.output, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == []
