"""ONNX Runtime's optimized CPU graphs kept in icd's cache: saved by the first session, opened by later ones with the
same outputs, made again when damaged, skipped with a note when they cannot be saved, kept apart per CPU and ONNX
Runtime version, turned off by ICD_ORT_CACHE, listed by `icd cache`. Real ONNX Runtime sessions over a small
convolutional graph (the CPU's blocked layouts apply to its convolutions)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime", reason="pip install 'icd[onnx]'")
onnx = pytest.importorskip("onnx", reason="pip install 'icd[onnx]'")

from icdcli.cli.main import main  # noqa: E402
from icdcli.core.digests import files_sha256  # noqa: E402
from icdcli.core.paths import cache_root  # noqa: E402
from icdcli.engines import onnxruntime as ort_engine  # noqa: E402
from icdcli.export.manifest import GraphSpec, TensorSpec  # noqa: E402


@pytest.fixture
def graph(tmp_path) -> tuple[Path, GraphSpec]:
    """conv 3x3 -> relu -> conv 3x3 over 4 channels, saved as an export's `vae_decoder.onnx`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "w2")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    value = helper.make_tensor_value_info
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "convs",
            [value("x", TensorProto.FLOAT, ["batch", 4, 16, 16])],
            [value("y", TensorProto.FLOAT, ["batch", 4, 16, 16])],
            weights,
        ),  # fmt: skip
        opset_imports=[helper.make_opsetid("", 17)],
    )
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(model, str(folder / "vae_decoder.onnx"))
    spec = GraphSpec("vae_decoder", "vae_decoder.onnx", [TensorSpec("x", "float32", ["batch", 4, 16, 16])],
                     [TensorSpec("y", "float32", ["batch", 4, 16, 16])])  # fmt: skip
    spec.sha256 = files_sha256(spec.files(folder))
    return folder, spec


X = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))


def run(folder: Path, spec: GraphSpec) -> torch.Tensor:
    runner = ort_engine.OrtGraph(folder / spec.file, spec, device=torch.device("cpu"), vae_scale_factor=8,
                                 model_name="convs")  # fmt: skip
    return runner({"x": X})["y"]


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The model file of every ONNX Runtime session opened."""
    import onnxruntime as ort

    paths: list[str] = []
    real = ort.InferenceSession

    def recording(path, *args, **kwargs):
        paths.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return paths


def prepared(kind: str = "onnxruntime") -> list[Path]:
    return sorted((cache_root() / kind).glob("*/vae_decoder-*"))


def plain_output(folder: Path, spec: GraphSpec, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setenv(ort_engine.CACHE_SETTING, "0")
        return run(folder, spec)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())


def test_the_first_session_saves_the_optimized_graph_and_later_ones_open_it(graph, opened, monkeypatch):
    folder, spec = graph
    reference = plain_output(folder, spec, monkeypatch)
    assert prepared() == [] and opened == [str(folder / spec.file)]
    first = run(folder, spec)
    (kept,) = prepared()
    assert (kept / ort_engine.COMPLETE).is_file() and (kept / ort_engine.OPTIMIZED).is_file()
    second = run(folder, spec)
    assert opened[1:] == [str(folder / spec.file), str(kept / ort_engine.OPTIMIZED)]
    assert_close(first, reference)
    assert_close(second, reference)
    source = json.loads((kept.parent / "source.json").read_text())
    assert source["info"]["name"] == "convs" and source["export"] == str(folder.resolve())


def test_a_damaged_optimized_graph_is_made_again(graph, opened, caplog):
    folder, spec = graph
    run(folder, spec)
    (kept,) = prepared()
    (kept / ort_engine.OPTIMIZED).write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="icd"):
        output = run(folder, spec)
    assert any("does not open" in record.getMessage() for record in caplog.records)
    assert (kept / ort_engine.COMPLETE).is_file() and (kept / ort_engine.OPTIMIZED).stat().st_size > 100
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert_close(run(folder, spec), output)
    assert caplog.records == [] and opened[-1] == str(kept / ort_engine.OPTIMIZED)


def test_a_graph_that_cannot_be_saved_runs_as_before_with_a_note(graph, monkeypatch, caplog):
    folder, spec = graph
    reference = plain_output(folder, spec, monkeypatch)
    monkeypatch.setattr(ort_engine, "OPTIMIZED", "missing-folder/graph.onnx")  # ONNX Runtime cannot write there
    runner = ort_engine.OrtGraph(folder / spec.file, spec, device=torch.device("cpu"), vae_scale_factor=8)
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert_close(runner({"x": X})["y"], reference)
    (note,) = [record.getMessage() for record in caplog.records]
    assert note.startswith("onnxruntime: vae_decoder runs without its optimized form in the cache (")
    assert not runner.keep_optimized and not (prepared()[0] / ort_engine.COMPLETE).exists()


def test_a_nearly_full_disk_is_left_its_space_and_a_kept_graph_still_opens(graph, monkeypatch, caplog, opened):
    import icdcli.core.paths

    folder, spec = graph
    reference = plain_output(folder, spec, monkeypatch)
    real_free = icdcli.core.paths.free_bytes
    monkeypatch.setattr(icdcli.core.paths, "free_bytes", lambda where: 2**29)  # 512 MB: under the 1 GB kept free
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert_close(run(folder, spec), reference)
    (note,) = [record.getMessage() for record in caplog.records]
    assert note.startswith("onnxruntime: vae_decoder runs without its optimized form in the cache (512.0 MB free on")
    assert not (prepared()[0] / ort_engine.COMPLETE).exists() and opened[-1] == str(folder / spec.file)
    monkeypatch.setattr(icdcli.core.paths, "free_bytes", real_free)
    run(folder, spec)  # room again: saved
    monkeypatch.setattr(icdcli.core.paths, "free_bytes", lambda where: 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert_close(run(folder, spec), reference)
    assert caplog.records == [] and opened[-1] == str(prepared()[0] / ort_engine.OPTIMIZED)  # opening takes no space


def test_a_damaged_export_is_still_told_in_one_line(graph):
    folder, spec = graph
    runner = ort_engine.OrtGraph(folder / spec.file, spec, device=torch.device("cpu"), vae_scale_factor=8)
    (folder / spec.file).write_bytes(b"damaged after the load's check")
    with pytest.raises(ort_engine.ICDError, match="the file is damaged or not an icd export"):
        runner({"x": X})


def test_another_cpu_or_onnxruntime_version_has_its_own_folder(graph, monkeypatch):
    folder, spec = graph
    run(folder, spec)
    settings = ort_engine.optimization_settings()
    monkeypatch.setattr(ort_engine, "optimization_settings", lambda: {**settings, "cpu": "another"})
    run(folder, spec)
    assert len(prepared()) == 2 and all((kept / ort_engine.COMPLETE).is_file() for kept in prepared())


def test_the_setting_turns_it_off(graph, monkeypatch, opened):
    monkeypatch.setenv(ort_engine.CACHE_SETTING, "off")
    run(*graph)
    run(*graph)
    assert prepared() == [] and len(set(opened)) == 1


def test_icd_cache_lists_optimized_graphs(graph):
    run(*graph)
    listing = CliRunner().invoke(main, ["cache", "list"])
    assert listing.exit_code == 0, listing.output
    assert "ort optimized" in listing.output and "convs" in listing.output
