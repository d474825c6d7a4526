import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from icdcli.cli.main import main
from icdcli.cli.train import variant_settings


def test_variant_settings():
    assert variant_settings("cd4") == {
        "forward_preservation": 0.0,
        "reverse_preservation": 0.0,
        "boundaries": "4step-tau0.8",
    }
    assert variant_settings("cd4+lf")["forward_preservation"] == 1.5
    assert variant_settings("cd4+lf+lr")["reverse_preservation"] == 1.5
    assert variant_settings("cd3")["boundaries"] == "3step-tau0.7"
    two = variant_settings("cd2")
    assert (two["forward_boundaries"], two["reverse_boundaries"]) == ((19, 499), (499, 999))
    for bad in ("cd5", "cd4+lr", "ddim50", ""):
        with pytest.raises(Exception, match="expected cd2"):
            variant_settings(bad)


@pytest.mark.slow
def test_train_smoke_packages_a_model_that_edits(tmp_path):
    """The whole chain at smoke scale, then a variant on the same teacher, both with TensorBoard; both packaged
    folders load and edit."""
    from PIL import Image

    from icdcli.training.scenes import Scene

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(run), "--smoke", "--tracker", "tensorboard"])
    assert result.exit_code == 0, result.output
    for stage in ("vae", "teacher", "guidance", "consistency"):
        assert f"{stage}: " in result.output  # what each stage loads or builds, before its progress bar
    manifest = json.loads((run / "model" / "icd.json").read_text())
    assert manifest["format"] == "lora" and manifest["forward_lora"] == "forward-19-259-519-779.safetensors"
    variant = CliRunner().invoke(main, ["train", str(run), "--smoke", "--variant", "cd2", "--tracker", "tensorboard"])
    assert variant.exit_code == 0, variant.output
    assert "guidance: finished earlier, kept" in variant.output
    for stage in ("vae", "teacher", "guidance", "consistency", "consistency-cd2"):
        assert list((run / "logs" / stage).glob("events.out.tfevents.*")), f"no TensorBoard events for {stage}"
    assert (
        json.loads((run / "variants" / "cd2" / "icd.json").read_text())["reverse_lora"] == "reverse-499-999.safetensors"
    )
    more = CliRunner().invoke(main, ["train", str(run), "--smoke", "--steps", "23"])  # a raised target: trains on
    assert more.exit_code == 0, more.output
    assert "consistency: finished at 20 steps; training on to 23 from" in more.output
    metrics = json.loads((run / "consistency" / "train_config.json").read_text())["metrics"]
    assert (metrics["resumed_from"], metrics["steps"]) == (20, 23)
    again = CliRunner().invoke(main, ["train", str(run), "--smoke", "--steps", "23"])
    assert again.exit_code == 0 and "consistency: finished earlier, kept" in again.output, again.output
    photo = tmp_path / "scene.png"
    Image.fromarray(Scene("circle", "red", "blue", 0.5, 0.5, 0.5).render(32)).save(photo)
    for folder in (run / "model", run / "variants" / "cd2"):
        out = str(tmp_path / f"{folder.name}.png")
        edited = CliRunner().invoke(
            main, ["edit", str(photo), "--src", "a red circle on a blue background", "--tgt",
                   "a green circle on a blue background", "--model", str(folder), "-o", out],
        )  # fmt: skip
        assert edited.exit_code == 0, edited.output
        assert Image.open(tmp_path / f"{folder.name}.png").size == (32, 32)


def _finished_stage(folder, steps, checkpoint=None):
    folder.mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps({"steps": steps, "metrics": {"steps": steps}}))
    if checkpoint is not None:
        (folder / "checkpoints" / f"step-{checkpoint}").mkdir(parents=True)
        (folder / "checkpoints" / f"step-{checkpoint}" / "step.json").write_text(json.dumps({"step": checkpoint}))
    return folder


def test_a_finished_consistency_stage_trains_on_only_to_a_raised_step_target_from_its_checkpoint(tmp_path):
    from dataclasses import replace

    from icdcli.training.consistency import ConsistencyConfig
    from icdcli.training.pipeline import consistency_continues

    said = []
    target = replace(ConsistencyConfig(), steps=800, time_budget_s=None)
    stage = _finished_stage(tmp_path / "consistency", 600, checkpoint=600)
    assert consistency_continues(stage, target, said.append)
    assert said == [f"finished at 600 steps; training on to 800 from {stage / 'checkpoints' / 'step-600'}"]
    assert not consistency_continues(stage, replace(target, steps=600), said.append)  # reached: kept
    capped = replace(target, time_budget_s=1500.0)  # v1: a time cap finished it; the same command again keeps it
    assert not consistency_continues(stage, capped, said.append)
    assert consistency_continues(stage, capped, said.append, target=True)  # --steps given with --minutes
    kept = _finished_stage(tmp_path / "kept", 600)  # restored from --keep-stages: no checkpoints
    assert not consistency_continues(kept, target, said.append)
    assert "its checkpoints are gone, so it cannot train on to 800; --force trains it again" in said[-1]


@pytest.mark.parametrize(
    ("missing", "args", "message"),
    [
        (("accelerate",), [], "icd train needs accelerate, which is not installed: run pip install accelerate"),
        (
            ("tensorboard", "tensorboardX"),
            ["--tracker", "tensorboard"],
            "--tracker tensorboard needs the tensorboard package, which is not installed: run pip install tensorboard",
        ),
    ],
)
def test_a_missing_package_is_one_line_that_says_what_to_install(tmp_path, monkeypatch, missing, args, message):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec and import both fail
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(run), "--smoke", *args])
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
    assert not run.exists()


@pytest.mark.slow
def test_ctrl_c_during_a_smoke_run_saves_and_exits_130(tmp_path):
    """A real SIGINT to `icd train --smoke` while its first stage trains: a checkpoint, the resume command, 130."""
    run = tmp_path / "run"
    command = [sys.executable, "-c", "from icdcli.cli.main import main; main()", "train", str(run), "--smoke"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (run / "vae" / "losses.jsonl").exists():  # the first losses are logged: the loop is running
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert stderr.splitlines()[0] == "icd train: loading PyTorch, diffusers and accelerate"
    assert "vae: rendering 256 training scenes" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the vae stage saved at step ") and f"run icd train {run} --smoke to" in last
    checkpoints = list((run / "vae" / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 1 and all((c / "step.json").is_file() for c in checkpoints)
    assert not (run / "vae" / "train_config.json").exists()


def test_ctrl_c_before_the_first_step_exits_130_and_says_how_to_continue(tmp_path, monkeypatch):
    import icdcli.training.teacher

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(icdcli.training.teacher, "render_batch", interrupted)  # Ctrl-C while the VAE's data renders
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(run), "--smoke", "--force", "--name", "my model", "--seed", "3"])
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (  # the same command, less --force (which would start over)
        f"interrupted: finished stages and saved checkpoints are kept; run icd train {run} --smoke --seed 3 "
        "--name 'my model' to continue"
    )


def test_ctrl_c_of_a_v2_run_in_the_cache_resumes_with_the_same_command(tmp_path, monkeypatch):
    import icdcli.training.teacher

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(icdcli.training.teacher, "render_batch", interrupted)
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["train", "--preset", "v2", "--smoke"])
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1].endswith("run icd train --preset v2 --smoke to continue")
    assert (tmp_path / "cache" / "train" / "v2" / "vae").is_dir()


def test_v2_preset_has_step_targets_and_no_time_caps():
    from icdcli.training.pipeline import V2_STEPS, PipelineConfig

    config = PipelineConfig.preset("v2")
    stages = {"vae": config.vae, "teacher": config.teacher, "guidance": config.guidance}
    stages["consistency"] = config.consistency
    assert {name: stage.steps for name, stage in stages.items()} == V2_STEPS
    assert all(stage.time_budget_s is None for stage in stages.values())
    assert PipelineConfig.preset("v1").teacher.time_budget_s == 1500.0  # v1 keeps its caps
    assert config.teacher.grounding_weight > 0 and PipelineConfig.preset("v1").teacher.grounding_weight == 0
    assert PipelineConfig.preset("v2", smoke=True).teacher.grounding_weight == config.teacher.grounding_weight
    with pytest.raises(ValueError, match="v3"):
        PipelineConfig.preset("v3")


@pytest.mark.slow
def test_train_v2_smoke_runs_in_the_cache_and_packages_a_16x16_latent_model(tmp_path, monkeypatch):
    from PIL import Image

    from icdcli.models.fusion import load_model_folder
    from icdcli.training.scenes import Scene

    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--preset", "v2", "--smoke"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "cache" / "train" / "v2" / "model"
    assert (folder / "icd.json").is_file() and not (tmp_path / "runs").exists()
    model = load_model_folder(folder)
    assert model.info.native_size == 32 and model.vae_scale_factor == 2  # 16x16 latents
    assert model.text_encoders[0].config.num_hidden_layers == 0  # each token's state: its own word and position
    photo = tmp_path / "scene.png"
    Image.fromarray(Scene("circle", "red", "blue", 0.5, 0.5, 0.5).render(32)).save(photo)
    edited = CliRunner().invoke(
        main, ["edit", str(photo), "--src", "a red circle on a blue background", "--tgt",
               "a green circle on a blue background", "--model", str(folder), "--blend", "red", "--blend", "green",
               "-o", str(tmp_path / "edited.png")],
    )  # fmt: skip
    assert edited.exit_code == 0, edited.output
    assert Image.open(tmp_path / "edited.png").size == (32, 32)
