"""The teacher's grounding loss: what it scores, and that a teacher trains with it."""

import json

import pytest
import torch

from icdcli.training.grounding import WORD_POSITIONS, grounding_loss, region_masks
from icdcli.training.scenes import Scene, vocabulary
from icdcli.training.tokenizer import build_word_tokenizer

SCENE = Scene("square", "red", "blue", 0.5, 0.5, 0.5)


def test_word_positions_are_the_caption_words_under_the_word_tokenizer():
    ids = build_word_tokenizer(vocabulary())(SCENE.caption()).input_ids
    vocab = build_word_tokenizer(vocabulary()).get_vocab()
    assert [ids[p] for p in WORD_POSITIONS] == [vocab["red"], vocab["square"], vocab["blue"]]


def test_grounding_loss_is_zero_inside_the_region_and_the_outside_share_squared_when_flat():
    masks = region_masks([SCENE], 8)  # (1, 3, 8, 8)
    inside = (masks[0, 0] == 1).flatten()
    localised = torch.full((1, 64, 16), 1e-9)
    localised[0][:, 2] = inside.float()
    localised[0][:, 3] = inside.float()
    localised[0][:, 6] = (masks[0, 2] == 1).flatten().float()
    assert float(grounding_loss([localised], {8: masks}, torch.tensor([True]))) == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((1, 64, 16), 1 / 16)
    area = float(masks[0, 0].mean())
    expected = ((1 - area) ** 2 * 2 + area**2) / 3
    assert float(grounding_loss([flat], {8: masks}, torch.tensor([True]))) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_teacher_trains_with_the_grounding_loss(tmp_path):
    from dataclasses import replace

    from icdcli.training.pipeline import PipelineConfig
    from icdcli.training.teacher import train_teacher, train_vae

    config = PipelineConfig.v2_smoke()
    vae = train_vae(replace(config.vae, steps=5), tmp_path / "vae")
    teacher = train_teacher(replace(config.teacher, steps=6, log_every=2, grounding_weight=0.1), vae, tmp_path / "t")
    logged = [json.loads(line) for line in (teacher / "losses.jsonl").read_text().splitlines()]
    assert logged and all(0.0 <= row["grounding"] <= 1.0 for row in logged)
    assert (teacher / "unet" / "diffusion_pytorch_model.safetensors").is_file()
