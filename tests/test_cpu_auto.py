"""`--backend auto` with `--precision auto` on a CPU (issue #30): PyTorch bf16 for an SD-size model where the CPU has
bf16 matrix instructions, everything else as before; the size rule; `icd info`'s statement of the rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from icdcli.backends.accelerated import (
    ENGINE_NAMES,
    BackendFacts,
    RunChoice,
    choose_backend,
    choose_run,
    probe_backends,
)
from icdcli.cli.main import main
from icdcli.core.errors import ICDError
from icdcli.models import size_class
from icdcli.models.size_class import LARGE_UNET_BYTES, is_sd_size, request_is_sd_size, request_unet_bytes
from icdcli.models.sources import ModelRequest

CPU = BackendFacts(cuda=False, tensorrt=False, onnxruntime=True, onnxruntime_cuda=False, onnx=True, openvino=True)
CPU_BF16 = BackendFacts(**{**CPU.__dict__, "cpu_bf16": True})
CPU_BF16_NO_ORT = BackendFacts(**{**CPU_BF16.__dict__, "onnxruntime": False})
CUDA = BackendFacts(cuda=True, tensorrt=True, onnxruntime=True, onnxruntime_cuda=True, onnx=True)
CUDA_NO_TRT = BackendFacts(cuda=True, tensorrt=False, onnxruntime=True, onnxruntime_cuda=False, onnx=True)
CUDA_BF16_HOST = BackendFacts(**{**CUDA.__dict__, "cpu_bf16": True})  # facts no probe makes: CUDA still wins

RULE = "SD-size model, this CPU has bf16 matrix instructions; --precision fp32 for ONNX Runtime fp32"


# --- the choice, a pure function of the facts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, precision, facts, sd_size, expected",
    [
        # the rule: auto with auto, an SD-size model, a CPU with bf16
        ("auto", "auto", CPU_BF16, True, RunChoice("torch", "bf16", RULE)),
        ("auto", "auto", CPU_BF16_NO_ORT, True, RunChoice("torch", "bf16", RULE.replace("ONNX Runtime", "PyTorch"))),
        # small or unknown models, CPUs without bf16: as before
        ("auto", "auto", CPU_BF16, False, RunChoice("onnxruntime", "auto")),
        ("auto", "auto", CPU_BF16, None, RunChoice("onnxruntime", "auto")),
        ("auto", "auto", CPU, True, RunChoice("onnxruntime", "auto")),
        ("auto", "auto", CPU, False, RunChoice("onnxruntime", "auto")),
        ("auto", "auto", CPU_BF16_NO_ORT, False, RunChoice("torch", "auto")),
        # an explicit precision or backend keeps its meaning
        ("auto", "fp32", CPU_BF16, True, RunChoice("onnxruntime", "fp32")),
        ("auto", "bf16", CPU_BF16, True, RunChoice("onnxruntime", "bf16")),
        ("auto", "fp16", CPU_BF16, True, RunChoice("onnxruntime", "fp16")),
        ("onnxruntime", "auto", CPU_BF16, True, RunChoice("onnxruntime", "auto")),
        ("openvino", "auto", CPU_BF16, True, RunChoice("openvino", "auto")),
        ("torch", "auto", CPU_BF16, True, RunChoice("torch", "auto")),
        ("torch", "bf16", CPU, True, RunChoice("torch", "bf16")),
        # CUDA devices are untouched
        ("auto", "auto", CUDA, True, RunChoice("tensorrt", "auto")),
        ("auto", "auto", CUDA_NO_TRT, True, RunChoice("torch", "auto")),
        ("auto", "auto", CUDA_BF16_HOST, True, RunChoice("tensorrt", "auto")),
        ("tensorrt", "fp16", CUDA, True, RunChoice("tensorrt", "fp16")),
    ],
)
def test_choose_run_table(backend, precision, facts, sd_size, expected):
    assert choose_run(backend, precision, facts, sd_size=sd_size) == expected
    if expected.reason is None:
        assert expected.backend == choose_backend(backend, facts)  # the backend auto picked before


def test_a_named_backend_that_cannot_run_is_still_an_error():
    with pytest.raises(ICDError, match="--device cpu"):
        choose_run("openvino", "auto", CUDA, sd_size=True)
    with pytest.raises(ICDError, match="NVIDIA GPU"):
        choose_run("tensorrt", "auto", CPU_BF16, sd_size=True)


def test_the_choice_line():
    assert RunChoice("onnxruntime", "auto").line() == "backend: onnxruntime (auto)"
    assert RunChoice("onnxruntime", "fp32").line() == "backend: onnxruntime (auto)"  # as before
    assert RunChoice("torch", "bf16", RULE).line() == f"backend: torch bf16 (auto: {RULE})"


@pytest.mark.parametrize("has, device, expected", [(True, "cpu", True), (False, "cpu", False), (None, "cpu", False),
                                                   (True, "meta", False)])  # fmt: skip
def test_probe_reads_the_cpu_flags_for_a_cpu_device(monkeypatch, has, device, expected):
    monkeypatch.setattr("icdcli.core.cpu.cpu_has_bf16", lambda flags=None: has)
    assert probe_backends(torch.device(device)).cpu_bf16 is expected


# --- the size rule --------------------------------------------------------------------------------------------------


def test_is_sd_size_has_a_named_threshold():
    assert LARGE_UNET_BYTES == 500 * 10**6
    assert is_sd_size(None) is None
    assert is_sd_size(12 * 10**6) is False and is_sd_size(LARGE_UNET_BYTES - 1) is False
    assert is_sd_size(LARGE_UNET_BYTES) is True and is_sd_size(1_719_000_000) is True
    assert is_sd_size(100, threshold=50) is True


def test_the_embedded_model_and_the_test_models_are_small(merged_dir, sd15_parts):
    assert 0 < request_unet_bytes(ModelRequest()) < LARGE_UNET_BYTES  # the embedded model: 12 MB of UNet
    assert request_is_sd_size(ModelRequest("default")) is False
    assert request_is_sd_size(ModelRequest(str(merged_dir))) is False
    parts = ModelRequest(None, str(sd15_parts.base), str(sd15_parts.teacher_pt), str(sd15_parts.forward_lora),
                         str(sd15_parts.reverse_lora))  # fmt: skip
    assert request_is_sd_size(parts) is False


@pytest.mark.parametrize("name", ["sd15", "sd15-tau0.7", "sd15-3step", "sdxl", "sd15-cycle"])
def test_presets_are_sd_size_without_their_files(name):
    assert request_is_sd_size(ModelRequest(name)) is True


def _sparse(path: Path, size: int = 3_400_000_000) -> Path:
    """A file of `size` bytes that takes no room on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.truncate(path, size)
    return path


def test_folders_and_files_of_sd_size_count_by_their_unet_bytes(tmp_path):
    merged = tmp_path / "merged"
    _sparse(merged / "forward_unet" / "diffusion_pytorch_model.safetensors")
    (merged / "icd.json").write_text(json.dumps({"format": "merged", "name": "big"}))
    assert request_unet_bytes(ModelRequest(str(merged))) == 3_400_000_000
    lora = tmp_path / "lora"
    _sparse(lora / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    (lora / "icd.json").write_text(json.dumps({"format": "lora", "base": "pipeline", "forward_lora": "f",
                                               "reverse_lora": "r"}))  # fmt: skip
    assert request_is_sd_size(ModelRequest(str(lora))) is True
    release = tmp_path / "release"
    for name in ("iCD-SD15-forward_19_259_519_779.safetensors", "iCD-SD15-reverse_259_519_779_999.safetensors"):
        (release / name).parent.mkdir(exist_ok=True)
        (release / name).write_bytes(b"{}")
    assert request_unet_bytes(ModelRequest(str(release))) == size_class.FAMILY_UNET_BYTES["sd15"]  # named by family
    _sparse(release / "sd15_cfg_distill.pt", 1_700_000_000)
    assert request_unet_bytes(ModelRequest(str(release))) == 1_700_000_000  # its teacher
    single = _sparse(tmp_path / "v1-5.safetensors", 2_100_000_000)
    parts = ModelRequest(None, str(single), None, str(release / "f.safetensors"), str(release / "r.safetensors"))
    assert request_is_sd_size(parts) is True


def test_a_size_that_cannot_be_told_cheaply_is_unknown(tmp_path):
    assert request_is_sd_size(ModelRequest("nobody-here/not-in-the-cache")) is None  # a hub id, not cached
    assert request_is_sd_size(ModelRequest(str(tmp_path / "absent"))) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "icd.json").write_text("{not json")
    assert request_is_sd_size(ModelRequest(str(tmp_path / "broken"))) is None


# --- the command line -----------------------------------------------------------------------------------------------


def _edit(tmp_path: Path, *flags: str):
    photo = tmp_path / "photo.png"
    if not photo.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    # --device cpu: the default device of a CPU machine, said so that a GPU machine tests the CPU rule too
    args = ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "--json", "--device", "cpu", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    record = json.loads(Image.open(line["output"]).text["icd"])  # the output's record: backend and precision
    assert record["backend"] == line["backend"]
    return record, result.stderr


@pytest.fixture
def auto_on_bf16_cpu(monkeypatch):
    """The defaults (--backend auto, --precision auto) on a CPU with bf16 matrix instructions, whatever this one has."""
    monkeypatch.delenv("ICD_BACKEND", raising=False)
    monkeypatch.setattr("icdcli.core.cpu.cpu_has_bf16", lambda flags=None: True)


def _auto_before() -> str:
    """The backend auto picked on this CPU before the rule (ONNX Runtime where it and onnx are installed)."""
    return choose_backend("auto", probe_backends("cpu"))


def test_the_embedded_model_keeps_auto_of_before_and_fp32_opts_out(auto_on_bf16_cpu, monkeypatch, tmp_path):
    record, stderr = _edit(tmp_path, "-o", str(tmp_path / "a.png"))
    assert (record["backend"], record["precision"]) == (_auto_before(), "float32")
    assert f"backend: {_auto_before()} (auto)" in stderr and "bf16" not in stderr
    monkeypatch.setattr(size_class, "LARGE_UNET_BYTES", 1)  # the embedded model counts as SD-size
    opted_out, stderr = _edit(tmp_path, "--precision", "fp32", "-o", str(tmp_path / "b.png"))
    assert (opted_out["backend"], opted_out["precision"]) == (_auto_before(), "float32")
    assert f"backend: {_auto_before()} (auto)" in stderr and "bf16" not in stderr


def test_an_sd_size_model_runs_on_torch_bf16_and_says_so(auto_on_bf16_cpu, monkeypatch, tmp_path):
    monkeypatch.setattr(size_class, "LARGE_UNET_BYTES", 1)  # the embedded model counts as SD-size
    record, stderr = _edit(tmp_path)
    assert (record["backend"], record["precision"]) == ("torch", "bfloat16")
    said = [line for line in stderr.splitlines() if line.startswith("backend:")]
    instead = ENGINE_NAMES[_auto_before()]
    assert said == [f"backend: torch bf16 (auto: {RULE.replace('ONNX Runtime', instead)})"]  # once


def test_info_states_the_cpu_rule(monkeypatch):
    for has, runs in ((True, "torch bf16"), (False, f"{_auto_before()} fp32")):
        monkeypatch.setattr("icdcli.cli.info.cpu_has_bf16", lambda flags=None, has=has: has)
        report = json.loads(CliRunner().invoke(main, ["info", "--json"]).stdout)
        assert report["cpu"] == {"bf16": has, "auto_large": runs}
        text = CliRunner().invoke(main, ["info"]).stdout
        assert f"cpu: bf16 {'yes' if has else 'no'}; auto runs SD-size models on {runs}" in text


def test_a_hub_id_in_the_hub_cache_counts_by_its_files(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--big-icd" / "snapshots" / ("0" * 40)
    _sparse(snapshot / "forward_unet" / "diffusion_pytorch_model.safetensors")
    (snapshot / "icd.json").write_text(json.dumps({"format": "merged"}))
    (tmp_path / "models--someone--big-icd" / "refs").mkdir()
    (tmp_path / "models--someone--big-icd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert request_is_sd_size(ModelRequest("someone/big-icd")) is True


def test_the_python_api_applies_the_rule_too(auto_on_bf16_cpu, monkeypatch):
    import torch

    from icdcli.run.model import load_pretrained

    small = load_pretrained(None, device="cpu", backend="auto")
    assert small.backend == _auto_before() and small.model.dtype == torch.float32
    monkeypatch.setattr(size_class, "LARGE_UNET_BYTES", 1)  # the embedded model counts as SD-size
    large = load_pretrained(None, device="cpu", backend="auto")
    assert large.backend == "torch" and large.model.dtype == torch.bfloat16
    named = load_pretrained(None, device="cpu", backend="auto", dtype=torch.float32)  # a named dtype wins
    assert named.backend == _auto_before() and named.model.dtype == torch.float32
