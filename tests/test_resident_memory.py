"""What the CPU engines keep resident between and after their runs (issue #30): ONNX Runtime's CPU sessions run
without a memory arena; OpenVINO gives the text encoder's and VAE's buffers back after each call and drops the pages
of a mapped weight file while its compile and first run read them (`icdcli.core.pages`)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from icdcli.core.pages import drop_mapped_pages, pages_dropped, read_only_mappings
from icdcli.export.manifest import GraphSpec, TensorSpec

MAPS = """\
7f0000000000-7f0000100000 r--s 00000000 08:01 42 /models/unet.onnx.data
7f0000100000-7f0000200000 rw-p 00100000 08:01 42 /models/unet.onnx.data
7f0000200000-7f0000300000 r--p 00000000 08:01 43 /models/vae.onnx
7f0000300000-7f0000301000 r-xp 00000000 08:01 44 /usr/lib/libc.so.6
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
"""


def resident_file_bytes() -> int:
    """Resident file-backed bytes of this process (RssFile, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_only_read_only_mappings_of_the_named_files_are_dropped():
    ranges = read_only_mappings([Path("/models/unet.onnx.data"), Path("/models/vae.onnx")], MAPS)
    # the writable private mapping of the same file may hold changes the file lacks: never dropped
    assert ranges == [(0x7F0000000000, 0x7F0000100000), (0x7F0000200000, 0x7F0000300000)]
    assert read_only_mappings([Path("/models/other.onnx")], MAPS) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps are Linux's")
def test_dropped_pages_leave_the_process_and_read_back_the_same(tmp_path):
    size = 64 << 20
    path = tmp_path / "weights.data"
    expected = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    expected.tofile(path)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        assert int(view[::4096].sum()) >= 0  # touch every page
        before = resident_file_bytes()
        advised = drop_mapped_pages([path])
        after = resident_file_bytes()
        assert advised == size
        assert before - after > size // 2, (before, after)
        np.testing.assert_array_equal(view, expected)  # read again from the page cache: the same bytes
        del view
    assert drop_mapped_pages([tmp_path / "absent.data"]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps are Linux's")
def test_pages_are_dropped_while_the_body_reads_and_once_more_after(tmp_path):
    size = 32 << 20
    path = tmp_path / "weights.data"
    np.zeros(size, dtype=np.uint8).tofile(path)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        with pages_dropped([path], interval=0.01):
            assert int(view[::4096].sum()) == 0
            touched = resident_file_bytes()
        assert touched - resident_file_bytes() > size // 2
        del view


# --- ONNX Runtime ------------------------------------------------------------------------------------------------


def tiny_graph(folder: Path, name: str) -> GraphSpec:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(folder / f"{name}.onnx"))
    spec = TensorSpec("x", "float32", [1, 4])
    return GraphSpec(name, f"{name}.onnx", [spec], [TensorSpec("y", "float32", [1, 4])])


@pytest.mark.parametrize(
    ("name", "arena"),
    [("text_encoder", False), ("vae_decoder", False), ("forward_unet", True), ("reverse_unet_p2p", True)],
)
def test_onnxruntime_cpu_sessions_keep_the_arena_only_for_small_unets(tmp_path, monkeypatch, name, arena):
    pytest.importorskip("onnxruntime")
    from icdcli.engines import onnxruntime as ort_engine

    spec = tiny_graph(tmp_path, name)
    graph = ort_engine.OrtGraph(tmp_path / spec.file, spec, device=torch.device("cpu"), vae_scale_factor=8)
    out = graph({"x": torch.tensor([[-1.0, 0.0, 2.0, -3.0]])})
    assert out["y"].tolist() == [[0.0, 0.0, 2.0, 0.0]]
    assert graph.session.get_session_options().enable_cpu_mem_arena is arena
    # an SD-size UNet (its graph and weights at least ARENA_UNETS_BELOW) runs without it
    monkeypatch.setattr(ort_engine, "ARENA_UNETS_BELOW", (tmp_path / spec.file).stat().st_size)
    graph.release()
    assert graph.session.get_session_options().enable_cpu_mem_arena is False


# --- OpenVINO (a fake core: the runtime itself never loads in the test process, see tests/test_openvino.py) -------


class FakeCompiled:
    def __init__(self, calls: list[str]):
        self.calls = calls

    def __call__(self, arrays: dict[str, Any], share_outputs: bool = True) -> dict[str, np.ndarray]:
        self.calls.append("run")
        return {"y": np.maximum(arrays["x"], 0)}

    def output(self, name: str) -> str:
        return name

    def release_memory(self) -> None:
        self.calls.append("release_memory")


class FakeCore:
    def __init__(self, calls: list[str]):
        self.calls = calls

    def compile_model(self, source: str, device: str, config: dict[str, str]) -> FakeCompiled:
        self.calls.append("compile")
        return FakeCompiled(self.calls)


@pytest.mark.parametrize(
    ("name", "gives_back"), [("text_encoder", True), ("vae_decoder", True), ("reverse_unet", False)]
)
def test_openvino_graphs_give_buffers_back_and_drop_pages_while_reading_weights(
    tmp_path, monkeypatch, name, gives_back
):
    from icdcli.engines import openvino as ov_engine

    calls: list[str] = []
    dropped: list[list[str]] = []

    class Recording:
        def __init__(self, paths: list[Path]):
            self.paths = [path.name for path in paths]

        def __enter__(self) -> None:
            calls.append("drop pages {")

        def __exit__(self, *exc: object) -> None:
            calls.append("}")
            dropped.append(self.paths)

    monkeypatch.setattr(ov_engine, "pages_dropped", Recording)
    spec = GraphSpec(name, f"{name}.onnx", [TensorSpec("x", "float32", [1, 4])], [TensorSpec("y", "float32", [1, 4])])
    spec.external_data = f"{name}.onnx.data"
    (tmp_path / spec.file).write_bytes(b"graph")
    graph = ov_engine.OpenVinoGraph(tmp_path / spec.file, spec, core=FakeCore(calls), config={})
    x = torch.tensor([[-1.0, 0.5, 2.0, -3.0]])
    for _ in range(2):
        assert graph({"x": x})["y"].tolist() == [[0.0, 0.5, 2.0, 0.0]]
    after_run = ["release_memory"] if gives_back else []
    # pages dropped while compiling and during the first run (which repacks the weights); not on later runs
    assert calls == ["drop pages {", "compile", "}", "drop pages {", "run", "}", *after_run, "run", *after_run]
    assert dropped == [[spec.file, spec.external_data]] * 2
    graph.release()
    calls.clear()
    graph({"x": x})  # compiled again after a release: its first run reads the weights again
    assert calls == ["drop pages {", "compile", "}", "drop pages {", "run", "}", *after_run]
