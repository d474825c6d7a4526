"""The training chain end to end in its smoke configuration, and the pure pieces it is made of."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from icdcli.schedule import RELEASED_CONFIGS, forward_pairs, reverse_pairs
from icdcli.training.common import read_log, window_means
from icdcli.training.consistency import (
    forward_boundary,
    reverse_boundary,
    solver_timesteps,
    teacher_move,
)
from icdcli.training.scenes import (
    COLOURS,
    EDIT_KINDS,
    SHAPES,
    SceneDataset,
    change_mask,
    edit_scene,
    scene_at,
    scenes,
    vocabulary,
)

LORA_KEY = re.compile(r"^unet\.base_model\.model\.[\w.]+\.lora_[AB]\.weight$")


# ---- scenes ----------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_splits_differ():
    assert scenes("train", 5, seed=3) == scenes("train", 5, seed=3)
    assert scenes("train", 5, seed=3) != scenes("heldout", 5, seed=3)
    assert scenes("train", 5, seed=3) != scenes("train", 5, seed=4)
    assert np.array_equal(scene_at("heldout", 7).render(32), scene_at("heldout", 7).render(32))


def test_render_and_caption_follow_the_scene():
    for scene in scenes("train", 50):
        image = scene.render(24)
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8
        assert scene.colour != scene.background
        assert tuple(image[0, 0]) == COLOURS[scene.background]
        assert scene.caption() == f"a {scene.colour} {scene.shape} on a {scene.background} background"
        assert set(scene.caption().split()) <= set(vocabulary())


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_one_attribute_and_the_mask_covers_the_change(kind):
    rng = np.random.default_rng(0)
    for source in scenes("heldout", 30):
        target = edit_scene(source, kind, rng)
        changed = [a for a in ("shape", "colour", "background") if getattr(source, a) != getattr(target, a)]
        assert changed == [kind]
        mask = change_mask(source, target, 32)
        differs = np.any(source.render(32) != target.render(32), axis=-1)
        assert mask.any() and np.array_equal(mask, differs)
        assert target.colour != target.background and target.shape in SHAPES


def test_dataset_yields_images_in_range_with_captions():
    data = SceneDataset("train", count=4, size=16)
    image, caption = data[2]
    assert image.shape == (3, 16, 16) and image.min() >= -1.0 and image.max() <= 1.0
    assert caption == data.scene(2).caption()
    with pytest.raises(IndexError):
        data.scene(4)


def test_classifier_reads_rendered_scenes():
    from icdcli.training.evaluate import classify_image

    for scene in scenes("heldout", 60):
        assert classify_image(scene.render(32)) == (scene.shape, scene.colour, scene.background)


# ---- multi-boundary timesteps ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASED_CONFIGS))
def test_segment_boundaries_match_the_sampler_pairs(name):
    config = RELEASED_CONFIGS[name]
    for t, s in reverse_pairs(config.reverse):
        assert reverse_boundary(t, config.reverse) == s
    for t, s in forward_pairs(config.forward):
        assert forward_boundary(t, config.forward) == s


def test_solver_grid_and_teacher_moves():
    grid = solver_timesteps(50)
    assert grid[:2] == [19, 39] and grid[-1] == 999 and len(grid) == 50
    reverse = RELEASED_CONFIGS["4step-tau0.8"].reverse
    forward = RELEASED_CONFIGS["4step-tau0.8"].forward
    assert reverse_boundary(279, reverse) == 259 and teacher_move(279, 259, 20) == 259
    assert reverse_boundary(259, reverse) == 0 and teacher_move(259, 0, 20) == 239
    assert teacher_move(19, 0, 20) == 0
    assert forward_boundary(19, forward) == 259 and teacher_move(19, 259, 20) == 39
    assert forward_boundary(979, forward) == 999 and teacher_move(979, 999, 60) == 999
    assert teacher_move(249 + 20, 249, 40) == 249  # boundaries off the grid are never overshot


# ---- the chain -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from icdcli.training.pipeline import PipelineConfig, run_pipeline

    return run_pipeline(PipelineConfig.smoke(), tmp_path_factory.mktemp("train-smoke"))


def _falls(path, key: str, window: int = 2) -> tuple[float, float]:
    first, last = window_means(read_log(path), key, window)
    assert last < first, f"{key} did not fall in {path}: {first:.5f} -> {last:.5f}"
    return first, last


def test_vae_trains_and_loads_back(smoke_run):
    from diffusers import AutoencoderKL

    _falls(smoke_run.vae / "losses.jsonl", "loss")
    vae = AutoencoderKL.from_pretrained(smoke_run.vae)
    metrics = json.loads((smoke_run.vae / "train_config.json").read_text())["metrics"]
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.scaling_factor != 0.18215
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_teacher_trains_and_loads_as_a_pipeline(smoke_run):
    from diffusers import StableDiffusionPipeline

    _falls(smoke_run.teacher / "losses.jsonl", "loss")
    pipeline = StableDiffusionPipeline.from_pretrained(smoke_run.teacher)
    assert pipeline.unet.config.time_cond_proj_dim is None
    assert pipeline.scheduler.config.steps_offset == 1 and pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.text_encoder.config.eos_token_id == pipeline.tokenizer.eos_token_id
    assert not list(smoke_run.teacher.rglob("*.bin")), "weights must be safetensors"
    tokens = pipeline.tokenizer("a red circle on a blue background").input_ids
    assert pipeline.tokenizer.unk_token_id not in tokens


def test_guidance_distillation_trains_a_guided_unet(smoke_run):
    from diffusers import UNet2DConditionModel

    _falls(smoke_run.guidance / "losses.jsonl", "loss")
    unet = UNet2DConditionModel.from_pretrained(smoke_run.guidance / "unet")
    assert unet.config.time_cond_proj_dim == 512
    assert unet.time_embedding.cond_proj.weight.abs().sum() > 0


def test_guided_student_starts_equal_to_the_teacher(smoke_run):
    from diffusers import UNet2DConditionModel

    from icdcli.denoiser import guidance_scale_embedding
    from icdcli.training.guidance import guided_student

    teacher = UNet2DConditionModel.from_pretrained(smoke_run.teacher / "unet").eval()
    student = guided_student(teacher).eval()
    x, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 64)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=hidden).sample
        embedding = guidance_scale_embedding(torch.tensor([1.0, 7.5]))
        got = student(x, t, encoder_hidden_states=hidden, timestep_cond=embedding).sample
    torch.testing.assert_close(got, expected)


def test_consistency_adapters_have_the_released_layout(smoke_run):
    from safetensors import safe_open

    from icdcli.lora import read_lora

    log = smoke_run.consistency / "losses.jsonl"
    _falls(log, "forward_preservation")
    _falls(log, "reverse_preservation")
    assert {"forward", "reverse"} <= set(read_log(log)[-1])
    meta = json.loads((smoke_run.consistency / "icd_lora.json").read_text())
    assert meta["forward"] == "forward-19-259-519-779.safetensors"
    assert meta["reverse"] == "reverse-259-519-779-999.safetensors"
    for name in (meta["forward"], meta["reverse"]):
        with safe_open(str(smoke_run.consistency / name), framework="pt") as handle:
            keys = list(handle.keys())
            assert handle.metadata() == {"lora_alpha": "4", "rank": "4"}
        assert keys and all(LORA_KEY.match(k) for k in keys), keys[:3]
        assert any(".to_q.lora_A" in k for k in keys) and any("time_emb_proj.lora_B" in k for k in keys)
        adapter = read_lora(smoke_run.consistency / name)
        assert adapter.rank == 4 and adapter.scale == 1.0
        assert any(up.abs().sum() > 0 for up in adapter.up.values()), "lora_B never moved from zero"


def test_adapters_load_back_onto_the_guided_unet(smoke_run):
    from icdcli.training.consistency import load_adapter
    from icdcli.training.guidance import load_guided_unet

    teacher = load_guided_unet(smoke_run.guidance)
    model = load_adapter(teacher, smoke_run.consistency / "reverse-259-519-779-999.safetensors")
    x, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 64)
    embedding = torch.zeros(1, 512)
    with torch.no_grad():
        student = model(x, torch.tensor([500]), encoder_hidden_states=hidden, timestep_cond=embedding).sample
        base = teacher(x, torch.tensor([500]), encoder_hidden_states=hidden, timestep_cond=embedding).sample
    assert not torch.allclose(student, base)


def test_consistency_resumes_from_its_latest_checkpoint(smoke_run):
    from icdcli.training.consistency import ConsistencyConfig, distill_consistency, latest_checkpoint

    checkpoint = latest_checkpoint(smoke_run.consistency)
    assert checkpoint is not None and checkpoint.name == "step-20"
    config = replace(ConsistencyConfig.smoke(), steps=23, resume="latest", checkpoint_every=0)
    distill_consistency(config, smoke_run.guidance, smoke_run.consistency)
    steps = [r["step"] for r in read_log(smoke_run.consistency / "losses.jsonl")]
    assert steps[-1] == 23 and steps[-2] == 21
    metrics = json.loads((smoke_run.consistency / "train_config.json").read_text())["metrics"]
    assert metrics["resumed_from"] == 20 and metrics["steps"] == 23


def test_gradient_checkpointing_changes_memory_not_losses(smoke_run, tmp_path):
    from icdcli.training.consistency import ConsistencyConfig, distill_consistency

    logs = []
    for checkpointing in (False, True):
        config = replace(
            ConsistencyConfig.smoke(), steps=2, log_every=1, checkpoint_every=0, gradient_checkpointing=checkpointing
        )
        out = distill_consistency(config, smoke_run.guidance, tmp_path / f"gc-{checkpointing}")
        logs.append([{k: v for k, v in r.items() if k != "time"} for r in read_log(out / "losses.jsonl")])
    assert len(logs[0]) == len(logs[1]) == 2
    for plain, checkpointed in zip(*logs, strict=True):
        assert plain == pytest.approx(checkpointed)


def test_stages_in_one_process_may_change_precision():
    from icdcli.training.common import make_accelerator

    assert make_accelerator().mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator().mixed_precision == "no"
