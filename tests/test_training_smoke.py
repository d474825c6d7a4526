"""The training chain end to end in its smoke configuration, and the pure pieces it is made of."""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from icdcli.diffusion.schedule import RELEASED_CONFIGS, forward_pairs, reverse_pairs
from icdcli.training.checkpoints import Checkpointer, latest_checkpoint, list_checkpoints, resolve_resume
from icdcli.training.common import TrainingInterrupted, read_log, records_until, window_means
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
        mask = change_mask(source, target, size=32)
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


def _interrupt_at(monkeypatch, module: str, index: int, how: str = "ctrl-c") -> None:
    """Interrupt the stages of `icdcli.training.<module>` once, as their step `index` begins: Ctrl-C
    (SIGINT, handled by the training loop) or a KeyboardInterrupt raised there (a second Ctrl-C)."""
    import importlib

    target = importlib.import_module(f"icdcli.training.{module}")
    original = target.step_generator
    fired: list[int] = []

    def step_generator(seed: int, step: int, rank: int = 0):
        if step == index and not fired:
            fired.append(step)
            if how == "ctrl-c":
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return original(seed, step, rank=rank)

    monkeypatch.setattr(target, "step_generator", step_generator)


STOP_INDEX = 6
"""The chain is interrupted once in every stage as its step 6 begins: that step completes, then it saves at 7."""


@dataclass
class StageRecord:
    """What a stage of the interrupted chain left when the chain finished (later tests train on)."""

    interrupt: TrainingInterrupted
    folder: Path
    steps: list[int]
    metrics: dict
    checkpoints: list[str]


@pytest.fixture(scope="module")
def smoke_chain(tmp_path_factory):
    """The smoke chain, Ctrl-C'd once in every stage and rerun each time: (outputs, a record per stage)."""
    from icdcli.training.pipeline import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("train-smoke")
    interrupts = []
    for module in ("teacher", "teacher", "guidance", "consistency"):  # train_vae and train_teacher live in teacher
        with pytest.MonkeyPatch.context() as patch:
            _interrupt_at(patch, module, STOP_INDEX)
            with pytest.raises(TrainingInterrupted) as stop:
                run_pipeline(PipelineConfig.smoke(), out)
        interrupts.append(stop.value)
    outputs = run_pipeline(PipelineConfig.smoke(), out)
    folders = (outputs.vae, outputs.teacher, outputs.guidance, outputs.consistency)
    records = [
        StageRecord(
            stop,
            folder,
            [r["step"] for r in read_log(folder / "losses.jsonl")],
            json.loads((folder / "train_config.json").read_text())["metrics"],
            [p.name for p in list_checkpoints(folder)],
        )
        for stop, folder in zip(interrupts, folders, strict=True)
    ]
    return outputs, records


@pytest.fixture(scope="module")
def smoke_run(smoke_chain):
    return smoke_chain[0]


def _falls(path, key: str, window: int = 2) -> tuple[float, float]:
    first, last = window_means(read_log(path), key, window)
    assert last < first, f"{key} did not fall in {path}: {first:.5f} -> {last:.5f}"
    return first, last


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_guidance_distillation_trains_a_guided_unet(smoke_run):
    from diffusers import UNet2DConditionModel

    _falls(smoke_run.guidance / "losses.jsonl", "loss")
    unet = UNet2DConditionModel.from_pretrained(smoke_run.guidance / "unet")
    assert unet.config.time_cond_proj_dim == 512
    assert unet.time_embedding.cond_proj.weight.abs().sum() > 0


@pytest.mark.slow
def test_guided_student_starts_equal_to_the_teacher(smoke_run):
    from diffusers import UNet2DConditionModel

    from icdcli.diffusion.denoiser import guidance_scale_embedding
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


@pytest.mark.slow
def test_consistency_adapters_have_the_released_layout(smoke_run):
    from safetensors import safe_open

    from icdcli.models.lora import read_lora

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- resume, interrupts, trackers --------------------------------------------------------------


@pytest.mark.slow
def test_every_stage_saves_on_ctrl_c_and_resumes_with_clean_logs(smoke_chain):
    from icdcli.training.pipeline import PipelineConfig

    _, records = smoke_chain
    smoke = PipelineConfig.smoke()
    assert [r.interrupt.stage for r in records] == ["vae", "teacher", "guidance", "consistency"]
    for record, config in zip(records, (smoke.vae, smoke.teacher, smoke.guidance, smoke.consistency), strict=True):
        stop, steps = record.interrupt, record.steps
        assert stop.step == STOP_INDEX + 1
        assert stop.checkpoint == record.folder / "checkpoints" / f"step-{STOP_INDEX + 1}"
        assert steps == sorted(set(steps)), f"{record.folder.name}: steps logged twice or out of order: {steps}"
        assert STOP_INDEX + 1 in steps and steps[-1] == config.steps
        assert (record.metrics["resumed_from"], record.metrics["steps"]) == (STOP_INDEX + 1, config.steps)
    # finished stages drop their resume points; the consistency stage keeps its newest to train on
    assert [r.checkpoints for r in records] == [[], [], [], ["step-10", "step-20"]]
    assert not list((records[-1].folder / "checkpoints").glob(".*")), "staging folder left behind"


def _micro_vae(**changes):
    from icdcli.training.teacher import VAEConfig

    micro = dict(train_scenes=32, batch_size=4, steps=6, checkpoint_every=3, log_every=1, scaling_scenes=16)
    return replace(VAEConfig.smoke(), heldout_scenes=8, warmup_steps=5, **{**micro, **changes})


def _losses(folder) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_log(folder / "losses.jsonl")]


@pytest.mark.slow
def test_a_resumed_stage_trains_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt mid-step) falls back on the last periodic checkpoint; the rerun
    cuts the log back to it and continues with the same optimizer, schedule and data."""
    from icdcli.training.teacher import train_vae

    whole = train_vae(_micro_vae(), tmp_path / "whole")
    _interrupt_at(monkeypatch, "teacher", 4, how="raise")
    with pytest.raises(TrainingInterrupted) as stop:
        train_vae(_micro_vae(), tmp_path / "split")
    assert stop.value.checkpoint == tmp_path / "split" / "checkpoints" / "step-3"
    assert [r["step"] for r in read_log(tmp_path / "split" / "losses.jsonl")] == [1, 2, 3, 4]
    monkeypatch.undo()
    split = train_vae(_micro_vae(resume="latest"), tmp_path / "split")
    assert [r["step"] for r in _losses(split)] == [1, 2, 3, 4, 5, 6]
    for resumed, straight in zip(_losses(split), _losses(whole), strict=True):
        assert resumed == pytest.approx(straight, rel=1e-5)
    assert json.loads((split / "train_config.json").read_text())["metrics"]["resumed_from"] == 3
    rerun = train_vae(_micro_vae(), tmp_path / "split")  # resume=None: from scratch, old log and checkpoints gone
    assert [r["step"] for r in _losses(rerun)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_tensorboard_tracker_writes_the_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from icdcli.training.teacher import train_vae

    train_vae(_micro_vae(tracker="tensorboard", checkpoint_every=0), tmp_path / "vae")
    logs = tmp_path / "logs" / "vae"
    assert list(logs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logs))
    events.Reload()
    assert {"vae/loss", "vae/kl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("vae/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_variant_resumes_after_ctrl_c_and_exits_130(smoke_run, monkeypatch):
    from click.testing import CliRunner

    from icdcli.cli.main import main

    run = smoke_run.guidance.parent
    args = ["train", str(run), "--smoke", "--variant", "cd4", "--steps", "6"]
    _interrupt_at(monkeypatch, "consistency", 3)
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 130, first.output
    checkpoint = run / "consistency-cd4" / "checkpoints" / "step-4"
    assert f"saved at step 4 to {checkpoint}; run icd train {run} --smoke --variant cd4 --steps 6 to resume" in (
        first.output
    )
    assert "Aborted!" not in first.output and "Traceback" not in first.output
    monkeypatch.undo()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "resuming from" in second.output and "consistency" in second.output  # progress: what it does, the bar
    folder = run / "consistency-cd4"
    assert [r["step"] for r in read_log(folder / "losses.jsonl")] == [3, 4, 6]
    metrics = json.loads((folder / "train_config.json").read_text())["metrics"]
    assert (metrics["resumed_from"], metrics["steps"]) == (4, 6)
    assert (run / "variants" / "cd4" / "icd.json").is_file()


# ---- checkpoints and logs: pure pieces --------------------------------------------------------------


class _FakeAccelerator:
    is_main_process = True
    num_processes = 1

    def __init__(self, fail: bool = False):
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.fail:
            raise KeyboardInterrupt  # killed mid-write


def _checkpoint(root, name: str, step: int | None) -> None:
    (root / name).mkdir(parents=True)
    if step is not None:
        (root / name / "step.json").write_text(json.dumps({"step": step}))


def test_only_complete_checkpoints_are_resume_points(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, "step-10", 10)
    _checkpoint(root, "step-20", 20)
    _checkpoint(root, "step-30", None)  # no step.json: not written to the end
    _checkpoint(root, ".step-40.partial", 40)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-20"]
    assert resolve_resume("latest", tmp_path) == root / "step-20"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        resolve_resume(str(root / "step-30"), tmp_path)


def test_a_checkpoint_killed_mid_write_leaves_the_previous_ones(tmp_path):
    _checkpoint(tmp_path / "checkpoints", "step-10", 10)
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(_FakeAccelerator(fail=True), tmp_path, every=10, kept=2).save(20)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"
    assert (tmp_path / "checkpoints" / ".step-20.partial").is_dir()  # what a kill leaves: ignored, then cleared
    saver = Checkpointer(_FakeAccelerator(), tmp_path, every=10, kept=2)
    for step in (20, 30):
        assert saver.save(step) == tmp_path / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-20", "step-30"]
    assert saver.at(30) == saver.last and saver.due(40) and not saver.due(45)


def test_log_cut_back_to_a_step_drops_later_and_broken_records():
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (5, 10, 12, 15)] + ['{"step": 20, "lo']
    assert records_until(lines, 12) == lines[:3]
    assert records_until(lines, 100) == lines[:4]
    assert records_until(lines, 0) == []


def test_ema_state_round_trips_through_a_checkpoint():
    from icdcli.training.common import EMA

    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            module.weight.add_(1.0)
        ema.update(module)
    restored = EMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    for key, value in ema.shadow.items():
        torch.testing.assert_close(restored.shadow[key], value)


def test_ctrl_c_stops_the_loop_after_its_step_and_restores_the_handler(tmp_path):
    from icdcli.training.common import LossLog, run_steps

    done: list[int] = []

    def step(index: int) -> dict[str, float]:
        if index == 2:
            signal.raise_signal(signal.SIGINT)
        done.append(index)
        return {"loss": float(index)}

    before = signal.getsignal(signal.SIGINT)
    log = LossLog(tmp_path / "losses.jsonl")
    with pytest.raises(TrainingInterrupted) as stop:
        run_steps(step, start_step=0, max_steps=10, log=log, log_every=2, show_progress=False)
    assert done == [0, 1, 2] and (stop.value.step, stop.value.checkpoint) == (3, None)
    assert [(r["step"], r["loss"]) for r in read_log(log.path)] == [(2, 0.5), (3, 2.0)]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_finished_stages_are_kept_in_float16_and_restored_on_a_fresh_machine(smoke_run, tmp_path, monkeypatch):
    import shutil

    from safetensors import safe_open

    from icdcli.training import pipeline as chain
    from icdcli.training.pipeline import PipelineConfig, run_pipeline

    run, kept = tmp_path / "run", tmp_path / "kept"
    for stage in (smoke_run.vae, smoke_run.teacher, smoke_run.guidance):
        shutil.copytree(stage, run / stage.name)
    (run / "vae" / "checkpoints" / "step-1").mkdir(parents=True)  # resume points never travel
    run_pipeline(replace(PipelineConfig.smoke(), consistency=None), run, keep=kept)  # finished: only kept
    weights = sorted(kept.rglob("*.safetensors"))
    assert {p.relative_to(kept).parts[0] for p in weights} == {"vae", "teacher", "guidance"}
    assert not (kept / "vae" / "checkpoints").exists() and (kept / "vae" / "train_config.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in kept.rglob("*"))
    for path in weights:
        with safe_open(str(path), framework="pt") as handle:
            assert {handle.get_tensor(key).dtype for key in handle.keys()} <= {torch.float16, torch.int64}  # noqa: SIM118

    def never(*args, **kwargs):
        raise AssertionError("a kept stage was trained again")

    for name in ("train_vae", "train_teacher", "distill_guidance"):
        monkeypatch.setattr(chain, name, never)
    fresh = tmp_path / "fresh"
    run_pipeline(replace(PipelineConfig.smoke(), consistency=None), fresh, keep=kept)
    for stage in ("vae", "teacher", "guidance"):
        assert (fresh / stage / "train_config.json").read_text() == (run / stage / "train_config.json").read_text()
    unet = "guidance/unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(fresh / unet), framework="pt") as restored, safe_open(str(run / unet), framework="pt") as own:
        for key in restored.keys():  # noqa: SIM118
            # float32 again, and equal to the float16-rounded weights the finishing run continued from
            assert restored.get_tensor(key).dtype == torch.float32
            assert torch.equal(restored.get_tensor(key), own.get_tensor(key))
    assert (run / "vae" / "checkpoints" / "step-1").is_dir()  # a run's own resume points are left where they were


def test_kept_configs_name_no_folder_of_the_training_machine(tmp_path):
    from icdcli.training.stages import keep_stage

    stage = tmp_path / "run" / "vae"
    stage.mkdir(parents=True)
    (stage / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "somewhere"), "a": 1}))
    (stage / "train_config.json").write_text(json.dumps({"steps": 1, "teacher": str(tmp_path / "run" / "teacher")}))
    keep_stage(stage, tmp_path / "kept" / "vae")
    assert json.loads((tmp_path / "kept" / "vae" / "config.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "kept" / "vae" / "train_config.json").read_text()) == {
        "steps": 1,
        "teacher": "../teacher",
    }
