"""The opt-in OpenVINO backend (issue #30): the embedded model's edits match ONNX Runtime's, a current export starts
without the model libraries and its compiled graphs are reused, bf16 runs where the CPU has it, int8 weights (NNCF)
stay near fp32, CUDA is refused, `auto` never picks it and `icd info` lists it.

The embedded model is exported once for the module (by the first ONNX Runtime edit); OpenVINO compiles that export.
Whatever imports `openvino` runs in a child process (`python -m icdcli ...`): OpenVINO's runtime, once loaded, made
the pytest process crash (SIGSEGV) in later tests that signal it (tests/test_stops.py), so it never loads here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

if importlib.util.find_spec("openvino") is None:  # not importorskip: that would load openvino here
    pytest.skip("openvino is not installed (pip install 'icd[openvino]')", allow_module_level=True)
pytest.importorskip("onnxruntime", reason="the parity reference runs on onnxruntime (pip install 'icd[onnx]')")

from icdcli.backends.accelerated import BackendFacts, backend_problem, choose_backend  # noqa: E402
from icdcli.cli.main import main  # noqa: E402
from icdcli.core.errors import ICDError  # noqa: E402
from icdcli.engines import openvino as ov_engine  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SRC, TGT = "a red circle on a blue background", "a yellow circle on a blue background"
METHODS = {"p2p-recipe": [], "swap": ["--method", "swap"]}
# uint8 pixels, as written: fp32 OpenVINO and fp32 ONNX Runtime measured identical on the embedded model (mean 0,
# max 0, both methods); the bounds leave room for other CPUs' kernels. bf16 measured mean 0.55, max 5 (P2P recipe)
# and 0.69, 7 (swap), of 255.
FP32_MEAN, FP32_MAX = 1.0, 8
BF16_MEAN, BF16_MAX = 2.0, 16
# int8 weights (NNCF, the UNets but their 1x1 convolutions) computing at bf16, against ONNX Runtime fp32 on the same
# export: measured mean 0.82, max 7 (P2P recipe) and 0.91, 8 (swap), of 255, on images of mean 125-130; at fp32
# compute 0.62, 7 and 0.90, 9. The bounds leave about 3x room and stay within issue #30's 3/255.
INT8_MEAN, INT8_MAX = 2.5, 24
INT8_CHILD = """
import sys
import numpy as np
from PIL import Image
from icdcli.bench.scale_engines import accelerate_row
from icdcli.diffusion.recipe import P2POptions, SamplerSettings, guidance_and_tau
from icdcli.editing.edits import edit
from icdcli.models.sources import ModelRequest, load_requested_model

image_path, source, target, out = sys.argv[1:5]
image, settings = Image.open(image_path).convert("RGB"), SamplerSettings("icd")
for row in sys.argv[5:]:
    backend, precision = row.split(":")
    model = load_requested_model(ModelRequest())
    runner = accelerate_row(model, backend, precision)
    guidance, tau = guidance_and_tau(model.info, "icd", guidance=None, tau=None)
    for method in ("p2p", "swap"):
        p2p = P2POptions().resolve(model.info.edit) if method == "p2p" else None
        edited = edit(runner, image, source, target, guidance=guidance, tau=tau, settings=settings, p2p=p2p)
        np.save(f"{out}/{backend}-{precision}-{method}.npy", np.asarray(edited))
"""


def facts(**overrides: bool) -> BackendFacts:
    values = dict(cuda=False, tensorrt=False, onnxruntime=False, onnxruntime_cuda=False, onnx=True, openvino=True)
    return BackendFacts(**(values | overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture
def shared_cache(cache, monkeypatch) -> Path:
    """The module's cache: the export made by the first edit serves every later one."""
    monkeypatch.setenv("ICD_CACHE_DIR", str(cache))
    return cache


def icd(*args: str) -> subprocess.CompletedProcess:
    """`icd ARGS` in a child process (see the module's docstring), with this process's environment."""
    return subprocess.run([sys.executable, "-m", "icdcli", *args], capture_output=True, text=True, env=dict(os.environ))


def cpu_has_bf16() -> bool:
    code = "from icdcli.engines.openvino import cpu_has_bf16; print(cpu_has_bf16())"
    return (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "True"
    )


def edit(out: Path, *flags: str) -> tuple[np.ndarray, dict]:
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(out), "--device", "cpu", "--json", *flags]
    result = icd(*args)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[0])
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64), record


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    gap = np.abs(a - b)
    return float(gap.mean()), float(gap.max())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_openvino_edits_as_onnxruntime(method, shared_cache, tmp_path):
    reference, _ = edit(tmp_path / "ort.png", "--backend", "onnxruntime", *METHODS[method])
    edited, record = edit(tmp_path / "ov.png", "--backend", "openvino", *METHODS[method])
    assert record["backend"] == "openvino"
    mean, largest = difference(edited, reference)
    assert mean <= FP32_MEAN and largest <= FP32_MAX, f"{method}: mean {mean:.3f}, max {largest}"


LEAN_PROBE = """
import sys
from click.testing import CliRunner
from icdcli.cli.main import main
result = CliRunner().invoke(main, sys.argv[1:])
assert result.exit_code == 0, result.output
print(",".join(name for name in ("diffusers", "transformers") if name in sys.modules))
"""
COMPILED = {"forward_unet", "reverse_unet_p2p", "text_encoder", "vae_encoder", "vae_decoder"}
"""The graphs of a P2P edit at the model's own size."""


def compiled_graphs(cache: Path) -> dict[Path, int]:
    return {blob: blob.stat().st_mtime_ns for blob in (cache / "openvino").glob("*/*/*.blob")}


@pytest.mark.slow
def test_a_current_export_starts_lean_and_reuses_its_compiled_graphs(shared_cache, tmp_path, monkeypatch):
    edit(tmp_path / "export.png", "--backend", "onnxruntime")  # the export is current
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(tmp_path / "lean.png"), "--device", "cpu",
            "--backend", "openvino"]  # fmt: skip
    probe = subprocess.run(
        [sys.executable, "-c", LEAN_PROBE, *args], capture_output=True, text=True, env=dict(os.environ)
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "", f"the lean start imported {probe.stdout.strip()}"
    compiled = compiled_graphs(shared_cache)
    assert {blob.parent.name.rsplit("-", 2)[0] for blob in compiled} >= COMPILED  # <graph>-<settings>-<digest>
    warm, _ = edit(tmp_path / "warm.png", "--backend", "openvino")
    assert compiled_graphs(shared_cache) == compiled, "the second edit imports what the first compiled"
    monkeypatch.setenv(ov_engine.CACHE_SETTING, "0")
    cold, _ = edit(tmp_path / "cold.png", "--backend", "openvino")
    lean = np.asarray(Image.open(tmp_path / "lean.png").convert("RGB"), dtype=np.float64)
    assert np.array_equal(warm, cold) and np.array_equal(lean, warm)


@pytest.mark.slow
def test_bf16_runs_where_the_cpu_has_it(shared_cache, tmp_path):
    if not cpu_has_bf16():
        args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(tmp_path / "bf16.png"), "--device", "cpu",
                "--precision", "bf16", "--backend", "openvino"]  # fmt: skip
        result = icd(*args)
        assert result.returncode != 0 and "lacks bf16" in result.stderr
        return
    reference, _ = edit(tmp_path / "ort.png", "--backend", "onnxruntime")
    edited, record = edit(tmp_path / "bf16.png", "--backend", "openvino", "--precision", "bf16")
    assert record["backend"] == "openvino"
    mean, largest = difference(edited, reference)
    assert mean <= BF16_MEAN and largest <= BF16_MAX, f"bf16: mean {mean:.3f}, max {largest}"


def int8_edits(out: Path, *rows: str) -> subprocess.CompletedProcess:
    """The embedded model's edit (P2P recipe and swap) on each `backend:precision` row, in a child process that saves
    the pixels under `out` (the rows of `icd bench scale`: `icd edit` takes no int8)."""
    args = [sys.executable, "-c", INT8_CHILD, str(EXAMPLE), SRC, TGT, str(out), *rows]
    return subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))


@pytest.mark.slow
def test_int8_weights_edit_near_fp32(shared_cache, tmp_path):
    if importlib.util.find_spec("nncf") is None:
        pytest.skip('nncf is not installed (pip install "icd[openvino-int8]")')
    result = int8_edits(tmp_path, "onnxruntime:fp32", "openvino:int8")
    assert result.returncode == 0, result.stderr
    assert "Weight Compression" not in result.stdout, "nncf's table and bar stay off stdout"
    for method in ("p2p", "swap"):
        reference = np.load(tmp_path / f"onnxruntime-fp32-{method}.npy").astype(np.float64)
        edited = np.load(tmp_path / f"openvino-int8-{method}.npy").astype(np.float64)
        mean, largest = difference(edited, reference)
        assert 0 < mean <= INT8_MEAN and largest <= INT8_MAX, f"int8 {method}: mean {mean:.3f}, max {largest}"


@pytest.mark.slow
def test_throughput_and_serve_take_openvino(shared_cache):
    result = icd("bench", "throughput", "--backend", "openvino", "--images", "4", "--batch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "openvino"
    assert [row["failed"] for row in report["rows"]] == [0, 0]
    assert all(row["images_per_second"] > 0 for row in report["rows"])
    assert "openvino" in icd("serve", "--help").stdout


def test_int8_compute_precision_and_hints():
    assert ov_engine.compute_precision("int8", bf16=True) == "bf16"
    assert ov_engine.compute_precision("int8", bf16=False) == "fp32"
    assert ov_engine.compile_config("int8", bf16=True)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert ov_engine.compile_config("int8")["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov_engine.compile_config("bf16", bf16=False)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert {"forward_unet", "reverse_unet", "reverse_unet_p2p"} <= ov_engine.COMPRESSED_GRAPHS
    assert "vae_decoder" not in ov_engine.COMPRESSED_GRAPHS


def test_int8_without_nncf_is_told_in_one_line(monkeypatch):
    monkeypatch.setattr(ov_engine, "nncf_importable", lambda: False)
    with pytest.raises(ICDError) as error:
        ov_engine.check_precision(object(), "int8")
    assert 'pip install "icd[openvino-int8]"' in str(error.value) and "\n" not in str(error.value)


def test_a_cpu_without_bf16_is_told_in_one_line(monkeypatch):
    monkeypatch.setattr(ov_engine, "cpu_has_bf16", lambda core=None: False)
    with pytest.raises(ICDError) as error:
        ov_engine.check_precision(object(), "bf16")
    assert "lacks bf16" in str(error.value) and "\n" not in str(error.value)
    ov_engine.check_precision(object(), "fp32")


def test_precision_hints():
    assert ov_engine.compile_config("fp32")["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov_engine.compile_config("bf16")["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(ICDError, match="fp32, bf16, int8"):
        ov_engine.compile_config("fp16")


def test_cuda_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = ["edit", str(EXAMPLE), "--src", SRC, "--tgt", TGT, "-o", str(tmp_path / "out.png"), "--device", "cuda",
            "--backend", "openvino"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    (line,) = [line for line in result.output.splitlines() if "openvino" in line]
    assert "CPU only" in line
    with pytest.raises(ICDError, match="CPU only"):
        ov_engine.check_device(torch.device("cuda"))


def test_backend_choice():
    assert choose_backend("openvino", facts()) == "openvino"
    assert choose_backend("auto", facts()) == "torch"  # opt-in: auto never picks it
    assert choose_backend("auto", facts(onnxruntime=True)) == "onnxruntime"
    assert "pip install 'icd[openvino]'" in (backend_problem("openvino", facts(openvino=False)) or "")
    assert "CPU only" in (backend_problem("openvino", facts(cuda=True)) or "")


def test_info_lists_openvino():
    result = icd("info", "--json")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)["backends"]["openvino"]
    assert entry["importable"] is True and entry["version"]
    assert entry["bf16"] == cpu_has_bf16()


def test_openvino_never_loads_in_this_process():
    assert "openvino" not in sys.modules and "nncf" not in sys.modules


def test_bf16_is_read_from_the_cpus_flags(tmp_path):
    from icdcli.core.cpu import cpu_flags, cpu_has_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_has_bf16(frozenset({"fpu", "amx_bf16"})) is True and cpu_has_bf16(frozenset({"fpu"})) is False
    assert cpu_flags(tmp_path / "missing") is None
