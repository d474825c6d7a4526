"""iCD-family checkpoints beyond the release: LoRA files of any name with their boundaries given, a forward model
that starts at 0, and the `sd15-cycle` preset (Inverse-and-Edit's cycle-consistency forward model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.core.errors import ModelSourceError
from icdcli.diffusion.sampler import icd_encode
from icdcli.diffusion.schedule import NoiseSchedule, parse_boundaries, validate_boundaries
from icdcli.models.sources import DEFAULT_MODEL_DIR, PRESETS, ModelRequest, load_requested_model

CYCLE_FILE = "finetuned_forward_model.safetensors"
CYCLE = (0, 259, 519, 779)
REVERSE = (259, 519, 779, 999)


# --- boundaries: parsing and rules ---------------------------------------------------------------------------


def test_boundaries_parse_from_comma_lists_and_name_the_rule_when_bad():
    assert parse_boundaries("0,259, 519,779") == CYCLE
    for bad, rule in (("259,19", "increasing"), ("19,259,1000", "0..999"), ("a,b", "comma list"), ("", "comma")):
        with pytest.raises(ValueError, match=rule):
            parse_boundaries(bad)


def test_a_forward_model_may_start_at_0_and_the_reverse_must_end_at_999():
    validate_boundaries(CYCLE, REVERSE)
    with pytest.raises(ValueError, match="must end at 999"):
        validate_boundaries((19, 259), (259, 900))
    with pytest.raises(ValueError, match="inner points"):
        validate_boundaries((0, 249, 519, 779), REVERSE)


def test_an_inversion_from_0_noises_to_the_first_timestep_and_jumps_from_there():
    schedule = NoiseSchedule.stable_diffusion()
    x0, noise, eps = torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -1.0), torch.full((1, 4, 2, 2), 0.25)
    calls: list[int] = []

    def forward(x, t, cond, guidance=1.0):
        calls.append(t)
        return eps

    out = icd_encode(forward, x0, None, (0, 259), noise, schedule)  # type: ignore[arg-type]
    a0, s0 = float(schedule.alpha_bar[0].sqrt()), float((1 - schedule.alpha_bar[0]).sqrt())
    start = a0 * x0 + s0 * noise  # alpha_bar_0 = 0.99915: not the clean latent
    at_259 = schedule.signal(259) * (start - s0 * eps) / a0 + schedule.noise(259) * eps
    expected = schedule.signal(999) * (at_259 - schedule.noise(259) * eps) / schedule.signal(259)
    expected = expected + schedule.noise(999) * eps
    assert calls == [0, 259]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert abs(s0 - 0.0292) < 1e-3  # the schedule's first step, as the cycle-consistency code noises it


# --- the cycle-consistency file, in the release's LoRA layout under its own name ---------------------------------


@pytest.fixture
def cycle_parts(sd15_parts, tmp_path) -> dict[str, Path]:
    """The sd15-cycle files as they are published: the release's reverse LoRA and teacher, and the fine-tuned
    forward model in the release's PEFT layout under its own name (written here from the release-layout fixture)."""
    folder = tmp_path / "icd-sd15-cycle"
    folder.mkdir()
    forward = folder / CYCLE_FILE
    shutil.copyfile(sd15_parts.forward_lora, forward)
    reverse = folder / "iCD-SD15-reverse_259_519_779_999.safetensors"
    shutil.copyfile(sd15_parts.reverse_lora, reverse)
    teacher = folder / "sd15_cfg_distill.pt"
    shutil.copyfile(sd15_parts.teacher_pt, teacher)
    return {"folder": folder, "forward": forward, "reverse": reverse, "teacher": teacher, "base": sd15_parts.base}


def test_the_preset_names_the_cycle_file_and_its_boundaries():
    preset = PRESETS["sd15-cycle"]
    assert preset.forward == CYCLE and preset.reverse == REVERSE
    assert preset.to_json()["lora_files"]["forward"] == f"ilushado/Cycle-consistency/{CYCLE_FILE}"
    reverse = preset.to_json()["lora_files"]["reverse"]
    assert reverse == "dbaranchuk/icd-lora-sd15/iCD-SD15-reverse_259_519_779_999.safetensors"


def test_the_preset_offline_gives_a_fetch_command_for_every_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as caught:
        load_requested_model(ModelRequest(model="sd15-cycle"))
    first, *commands = str(caught.value).splitlines()
    assert "--forward-boundaries 0,259,519,779" in first
    joined = "\n".join(commands)
    for expected in (f"ilushado/Cycle-consistency {CYCLE_FILE}", "iCD-SD15-reverse_259_519_779_999.safetensors",
                     "alexnasa/Inverse-and-Edit sd15_cfg_distill.pt", "stable-diffusion-v1-5"):  # fmt: skip
        assert expected in joined, joined


def test_the_preset_loads_the_cycle_file_fusing_every_module(cycle_parts, sd15_parts):
    request = ModelRequest(
        model="sd15-cycle", base=str(cycle_parts["base"]), teacher=str(cycle_parts["teacher"]),
        forward_lora=str(cycle_parts["forward"]), reverse_lora=str(cycle_parts["reverse"]),
    )  # fmt: skip
    model = load_requested_model(request)
    assert model.info.forward_boundaries == CYCLE and model.info.reverse_boundaries == REVERSE
    ours, theirs = model.forward_unet.state_dict(), sd15_parts.forward_by_hand.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) <= 1e-6


def _edit(args: list[str], tmp_path: Path) -> tuple[int, str, Path]:
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(
        main, ["edit", str(image), "--src", "a cat", "--tgt", "a dog", "-o", str(out), "--device", "cpu", *args]
    )
    return result.exit_code, result.output, out


def test_icd_edit_runs_end_to_end_with_the_preset_and_the_real_file_name(cycle_parts, tmp_path):
    code, output, out = _edit(
        ["--model", "sd15-cycle", "--base", str(cycle_parts["base"]), "--teacher", str(cycle_parts["teacher"]),
         "--forward-lora", str(cycle_parts["forward"]), "--reverse-lora", str(cycle_parts["reverse"]),
         "--backend", "torch", "--method", "swap"],
        tmp_path,
    )  # fmt: skip
    assert code == 0, output
    assert Image.open(out).size == (64, 64)


def test_a_lora_of_any_name_edits_once_its_boundaries_are_given(cycle_parts, tmp_path):
    parts = ["--base", str(cycle_parts["base"]), "--teacher", str(cycle_parts["teacher"]),
             "--forward-lora", str(cycle_parts["forward"]), "--reverse-lora", str(cycle_parts["reverse"]),
             "--backend", "torch", "--method", "swap"]  # fmt: skip
    code, output, _ = _edit(parts, tmp_path)
    assert code != 0 and "does not name its boundaries" in output and "--forward-boundaries" in output
    code, output, out = _edit([*parts, "--forward-boundaries", "0,259,519,779"], tmp_path)
    assert code == 0, output and out.is_file()
    # a release folder holding the file, with the flag
    code, output, _ = _edit(["--model", str(cycle_parts["folder"]), "--base", str(cycle_parts["base"]),
                             "--forward-boundaries", "0,259,519,779", "--backend", "torch", "--method", "swap",
                             "--overwrite"], tmp_path)  # fmt: skip
    assert code == 0, output


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        (["--forward-boundaries", "259,19"], "increasing"),
        (["--forward-boundaries", "0,259,519"], "equal length"),
        (["--forward-boundaries", "0,249,519,779"], "inner points"),
        (["--forward-boundaries", "0,259,519,779", "--reverse-boundaries", "259,519,779,998"], "names the boundaries"),
    ],
)
def test_bad_boundaries_give_a_one_line_error_that_names_the_rule(cycle_parts, tmp_path, flags, rule):
    code, output, _ = _edit(
        ["--base", str(cycle_parts["base"]), "--teacher", str(cycle_parts["teacher"]),
         "--forward-lora", str(cycle_parts["forward"]), "--reverse-lora", str(cycle_parts["reverse"]),
         "--backend", "torch", *flags],
        tmp_path,
    )  # fmt: skip
    assert code != 0 and rule in output, output
    assert "Traceback" not in output


# --- a forward boundary of 0 on the embedded model's parts, in PyTorch and in the exported graphs ----------------


@pytest.fixture
def embedded_from_zero(tmp_path) -> Path:
    folder = tmp_path / "from-zero"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    data = json.loads((folder / "icd.json").read_text())
    (folder / data["forward_lora"]).rename(folder / CYCLE_FILE)
    data.update(forward_lora=CYCLE_FILE, forward_boundaries=list(CYCLE), name="from-zero")
    (folder / "icd.json").write_text(json.dumps(data))
    return folder


@pytest.mark.slow
def test_a_forward_boundary_of_0_edits_alike_in_pytorch_and_in_the_exported_graphs(embedded_from_zero, tmp_path):
    example = Path(__file__).parent.parent / "examples" / "red-circle.png"
    results = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.png"
        result = CliRunner().invoke(main, [
            "edit", str(example), "--src", "a red circle on a blue background",
            "--tgt", "a yellow circle on a blue background", "--model", str(embedded_from_zero),
            "--backend", backend, "--device", "cpu", "--method", "swap", "-o", str(out),
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        results[backend] = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    model = load_requested_model(ModelRequest(model=str(embedded_from_zero)))
    assert model.info.forward_boundaries == CYCLE
    difference = np.abs(results["torch"] - results["onnxruntime"])
    assert difference.max() <= 3 and difference.mean() <= 0.25
