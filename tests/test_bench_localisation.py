"""The measurements the embedded model's goals need, on the embedded model itself: the VAE ceiling of the
inversion table, local blend on the edited word, and how well each caption word's cross-attention map localises."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from icdcli.bench.inversion import bench_inversion
from icdcli.bench.scenes import edit_pairs, heldout_scenes, source_attention_maps, word_region
from icdcli.bench.shapes_edit import (
    EDIT_METHODS,
    REFERENCES,
    bench_localisation,
    bench_shapes_edit,
    blend_on_edited_word,
    mask_iou,
)
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.models.sources import DEFAULT_MODEL_DIR
from icdcli.training.scenes import render_batch

CAPTION = "a red circle on a blue background"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from icdcli.models.fusion import load_model_folder

    with pytest.MonkeyPatch.context() as patch:  # the fused model goes to a cache of this module's own
        patch.setenv("ICD_CACHE_DIR", str(tmp_path_factory.mktemp("icd-cache")))
        return load_model_folder(DEFAULT_MODEL_DIR, need_teacher=True).to("cpu", torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "pipeline" / "tokenizer")


def _blob_maps(tokenizer, word: str, inside: np.ndarray, *, side: int) -> torch.Tensor:
    """(side^2, L) maps where `word`'s tokens attend only inside `inside` (side x side) and every other token evenly."""
    length = tokenizer.model_max_length
    maps = torch.full((side * side, length), 1.0 / length)
    from icdcli.diffusion.p2p.tokens import word_indicator

    tokens = word_indicator(tokenizer, CAPTION, [word]).bool()
    maps[:, tokens] = torch.from_numpy(inside.reshape(-1, 1).astype(np.float32))
    return maps


def test_word_region_marks_a_localised_map_and_covers_everything_for_a_flat_one(tokenizer):
    shape = np.zeros((32, 32), dtype=bool)
    shape[8:20, 12:24] = True
    inside = shape.reshape(8, 4, 8, 4).any(axis=(1, 3))  # the shape at the 8x8 map's resolution
    maps = _blob_maps(tokenizer, "red", inside, side=8)

    def region(word: str) -> np.ndarray:
        return word_region(tokenizer, CAPTION, word, maps, side=8, image_hw=(32, 32), threshold=0.3)

    localised = region("red")
    # local blend max-pools 3x3 before thresholding: the region is the shape grown by one map cell (4 px)
    grown = np.zeros_like(shape)
    grown[4:24, 8:28] = True
    assert np.array_equal(localised, grown)
    assert mask_iou(localised, shape) == pytest.approx(shape.sum() / grown.sum())
    flat = region("circle")  # every cell of its map is the same
    assert flat.all() and mask_iou(flat, shape) == pytest.approx(shape.mean())


def test_mask_iou():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(4 / 12) and mask_iou(a, a) == 1.0 and mask_iou(~a & a, ~b & b) == 1.0


def test_blend_on_edited_word_names_the_changed_word_in_each_prompt():
    for source, target, kind in edit_pairs(6):
        settings = blend_on_edited_word(P2PSettings(), source, target, kind)
        (before,), (after,) = settings.blend_source, settings.blend_target
        assert before in source.caption().split() and after in target.caption().split() and before != after
        position = {"colour": 1, "shape": 2, "background": 5}[kind]
        assert source.caption().split()[position] == before and target.caption().split()[position] == after


def test_source_attention_maps_are_local_blends_sums_of_softmax_rows(embedded):
    pixels, captions = render_batch(heldout_scenes(3), embedded.info.native_size)
    maps, side = source_attention_maps(
        embedded, pixels, captions, settings=SamplerSettings("icd", 50, 0), guidance=4.0, tau=0.8, p2p=P2PSettings()
    )
    assert side == 16 and len(maps) == 3  # the embedded model's 16x16 latents: local blend reads its 16x16 maps
    for found in maps:
        assert found.shape == (side * side, embedded.tokenizers[0].model_max_length) and (found >= 0).all()
        # each layer's head-averaged softmax rows sum to 1: over the steps and the 16x16 layers, a whole count
        sums = found.sum(-1)
        layers = float(sums[0].round())
        assert layers >= 4 and torch.allclose(sums, torch.full_like(sums, layers), rtol=1e-4)


@pytest.mark.slow
def test_vae_row_is_the_ceiling_of_the_inversion_table(embedded):
    result = bench_inversion({"cd4+lf+lr": embedded}, embedded, count=4, batch=4)
    rows = {row["config"]: row for row in result["rows"]}
    assert result["rows"][0]["config"] == "vae"
    assert rows["vae"]["psnr"] > 20.0  # the model card's held-out VAE figure is 24.4 dB
    assert all(rows["vae"]["psnr"] > row["psnr"] for name, row in rows.items() if name != "vae")


@pytest.mark.slow
def test_shapes_edit_blend_row_and_localisation_on_the_embedded_model(embedded):
    methods = tuple(m for m in EDIT_METHODS if m.name in ("icd4-p2p", "icd4-p2p-blend"))
    result = bench_shapes_edit(embedded, count=3, batch=9, methods=methods)
    assert [(r["method"], r["kind"]) for r in result["rows"]][4:] == [
        ("icd4-p2p-blend", "colour"), ("icd4-p2p-blend", "shape"), ("icd4-p2p-blend", "background"),
        ("icd4-p2p-blend", "all"),
    ]  # fmt: skip
    rows = result["localisation"]
    assert [row["word_kind"] for row in rows] == ["colour", "shape", "background"]
    again = bench_localisation(embedded, heldout_scenes(3), batch=2)
    for row, same in zip(rows, again, strict=True):  # batching does not change the maps beyond rounding
        assert row["iou"] == pytest.approx(same["iou"], abs=0.02) and row["region"] == pytest.approx(
            same["region"], abs=0.02
        )
    for row in rows:
        assert (
            0.0 <= row["iou"] <= 1.0
            and 0.0 < row["region"] <= 1.0
            and 3 * row["localised"] == pytest.approx(round(3 * row["localised"]))
        )


@pytest.mark.slow
def test_the_reference_rows_bound_what_an_edit_can_keep(embedded):
    """`vae` is the source unedited (never the target's attribute) and keeps the most of it; the oracle latent blend
    changes every edited attribute and keeps less: the VAE's receptive field carries the change across cells."""
    methods = tuple(m for m in EDIT_METHODS if m.editing in REFERENCES)
    result = bench_shapes_edit(embedded, count=6, batch=9, methods=methods, localisation=False)
    rows = {(row["method"], row["kind"]): row for row in result["rows"]}
    assert rows[("vae", "all")]["accuracy"] == 0.0
    assert rows[("latent-blend-oracle", "all")]["accuracy"] >= 0.8
    for kind in ("colour", "shape", "background", "all"):
        assert rows[("vae", kind)]["psnr_background"] > rows[("latent-blend-oracle", kind)]["psnr_background"], kind
