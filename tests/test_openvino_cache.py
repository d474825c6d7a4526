"""OpenVINO's compiled graphs kept in icd's cache: where they go, a graph exported again gets a new folder (OpenVINO
itself keys by path only), the setting that turns it off, a cache that cannot be used, and `icd cache` listing it.

A fake OpenVINO core stands in here: whatever imports `openvino` runs in a child process (see tests/test_openvino.py),
where the real compile, import and the lean start are tested.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from icdcli.cli.main import main
from icdcli.core.errors import ICDError
from icdcli.core.paths import cache_root
from icdcli.engines import openvino as ov_engine
from icdcli.export.manifest import GraphSpec, TensorSpec

F32, BF16 = ov_engine.compile_config("fp32"), ov_engine.compile_config("bf16")


def graph_spec(name: str = "forward_unet") -> GraphSpec:
    spec = GraphSpec(name, f"{name}.onnx", [TensorSpec("x", "float32", [1, 4])], [TensorSpec("y", "float32", [1, 4])])
    spec.external_data, spec.sha256 = f"{name}.onnx.data", "ab" * 32
    return spec


@pytest.fixture
def export(tmp_path) -> tuple[Path, GraphSpec]:
    folder = tmp_path / "model-0123456789abcdef-fp32"
    folder.mkdir()
    spec = graph_spec()
    for path in spec.files(folder):
        path.write_bytes(b"graph")
    return folder, spec


class FakeCompiled:
    def __init__(self) -> None:
        self.outputs = {"y": object()}

    def output(self, name: str) -> object:
        return self.outputs[name]

    def __call__(self, arrays: dict, share_outputs: bool = False) -> dict:
        return {self.outputs["y"]: arrays["x"] * 2}

    def release_memory(self) -> None:
        pass


class FakeCore:
    """Records each compile's settings; `fail_with_cache` / `fail_always` make compiles raise as OpenVINO does."""

    def __init__(self, *, fail_with_cache: bool = False, fail_always: bool = False):
        self.configs: list[dict[str, str]] = []
        self.fail_with_cache, self.fail_always = fail_with_cache, fail_always

    def compile_model(self, source: object, device: str, config: dict[str, str]) -> FakeCompiled:
        self.configs.append(dict(config))
        if self.fail_always or (self.fail_with_cache and "CACHE_DIR" in config):
            raise RuntimeError("Exception from src/inference/src/cache_manager.hpp: cannot write the blob\nmore")
        return FakeCompiled()


def test_each_graph_compiles_into_its_own_folder_named_for_its_contents(export):
    folder, spec = export
    cached = ov_engine.compiled_cache(folder, spec, F32, name="model")
    assert cached is not None and cached.is_dir()
    entry = cached.parent
    assert entry.parent == cache_root() / "openvino" and entry.name.startswith(folder.name + "-")
    assert cached.name.startswith("forward_unet-")
    assert json.loads((entry / "source.json").read_text())["info"]["name"] == "model"
    assert ov_engine.compiled_cache(folder, spec, F32) == cached  # the same graph: the same folder
    other = graph_spec("vae_decoder")
    for path in other.files(folder):
        path.write_bytes(b"vae")
    assert ov_engine.compiled_cache(folder, other, F32).parent == entry  # one cache entry per export


def test_a_graph_exported_again_compiles_anew_and_its_old_compilation_goes(export):
    folder, spec = export
    first = ov_engine.compiled_cache(folder, spec, F32)
    assert first is not None
    (first / "123.blob").write_bytes(b"compiled")
    (folder / spec.external_data).write_bytes(b"new weights")  # same path, new contents: OpenVINO would not notice
    second = ov_engine.compiled_cache(folder, spec, F32)
    assert second is not None and second != first and second.parent == first.parent
    assert not first.exists()


def test_each_precision_has_its_own_folder(export):
    # OpenVINO's own key leaves the precision hint out: it imported an f32 compilation for a bf16 compile
    folder, spec = export
    fp32, bf16 = ov_engine.compiled_cache(folder, spec, F32), ov_engine.compiled_cache(folder, spec, BF16)
    assert fp32 is not None and bf16 is not None and fp32 != bf16
    assert fp32.is_dir() and bf16.is_dir()  # neither is an earlier version of the other


def test_the_same_export_name_elsewhere_is_another_entry(tmp_path, export):
    folder, spec = export
    elsewhere = tmp_path / "out" / folder.name
    elsewhere.mkdir(parents=True)
    for path in spec.files(elsewhere):
        path.write_bytes(b"graph")
    here, there = ov_engine.compiled_cache(folder, spec, F32), ov_engine.compiled_cache(elsewhere, spec, F32)
    assert here is not None and there is not None and here.parent != there.parent


@pytest.mark.parametrize("value", ["0", "off", "No", "false"])
def test_the_setting_turns_the_cache_off(export, monkeypatch, value):
    monkeypatch.setenv(ov_engine.CACHE_SETTING, value)
    assert ov_engine.compiled_cache(*export, F32) is None
    assert not (cache_root() / "openvino").exists()


def test_a_cache_that_cannot_be_written_compiles_without_it(export):
    cache_root().mkdir(parents=True, exist_ok=True)
    (cache_root() / "openvino").write_text("a file where the folder should be")
    assert ov_engine.compiled_cache(*export, F32) is None


def test_graphs_compile_with_their_cache_folder(export):
    folder, spec = export
    cached = ov_engine.compiled_cache(folder, spec, F32)
    core = FakeCore()
    graph = ov_engine.OpenVinoGraph(folder / spec.file, spec, core=core, config={"A": "1"}, cache=cached)
    x = torch.ones(1, 4)
    assert graph({"x": x})["y"].tolist() == [[2.0] * 4]
    assert core.configs == [{"A": "1", "CACHE_DIR": str(cached)}]


def test_int8_graphs_are_not_cached(export):
    folder, spec = export
    graph = ov_engine.OpenVinoGraph(
        folder / spec.file, spec, core=FakeCore(), config={}, compress=lambda model: model,
        cache=ov_engine.compiled_cache(folder, spec, F32),
    )  # fmt: skip
    assert graph.cache is None


def test_a_compile_failing_with_the_cache_runs_without_it_with_a_note(export, caplog):
    folder, spec = export
    core = FakeCore(fail_with_cache=True)
    cached = ov_engine.compiled_cache(folder, spec, F32)
    graph = ov_engine.OpenVinoGraph(folder / spec.file, spec, core=core, config={}, cache=cached)
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert graph({"x": torch.ones(1, 4)})["y"].tolist() == [[2.0] * 4]
    assert [("CACHE_DIR" in config) for config in core.configs] == [True, False]
    (note,) = [record.getMessage() for record in caplog.records]
    assert note == "openvino: forward_unet compiled without its cache (Exception from src/inference/src/" \
        "cache_manager.hpp: cannot write the blob)"  # fmt: skip
    graph.release()
    graph({"x": torch.ones(1, 4)})
    assert "CACHE_DIR" not in core.configs[-1]  # not tried again in this run


def test_a_nearly_full_disk_compiles_without_writing_but_imports_a_kept_graph(export, monkeypatch, caplog):
    import icdcli.core.paths

    folder, spec = export
    monkeypatch.setattr(icdcli.core.paths, "free_bytes", lambda where: 2**20)
    core = FakeCore()
    found = lambda: ov_engine.compiled_cache(folder, spec, F32)  # noqa: E731 (as load_parts: found on first compile)
    graph = ov_engine.OpenVinoGraph(folder / spec.file, spec, core=core, config={}, cache=found)
    with caplog.at_level(logging.WARNING, logger="icd"):
        graph({"x": torch.ones(1, 4)})
    assert core.configs == [{}]
    (note,) = [record.getMessage() for record in caplog.records]
    assert note == "openvino: forward_unet compiled without its cache (1.0 MB free on its disk, about 10 B needed " \
        "and 1.0 GB kept free)"  # fmt: skip
    (found() / "123.blob").write_bytes(b"compiled")  # a graph compiled earlier, when there was room
    again = ov_engine.OpenVinoGraph(folder / spec.file, spec, core=core, config={}, cache=found)
    again({"x": torch.ones(1, 4)})
    assert core.configs[-1] == {"CACHE_DIR": str(found())}


def test_a_damaged_graph_is_still_told_in_one_line(export, caplog):
    folder, spec = export
    graph = ov_engine.OpenVinoGraph(
        folder / spec.file,
        spec,
        core=FakeCore(fail_always=True),
        config={},
        cache=ov_engine.compiled_cache(*export, F32),
    )
    with caplog.at_level(logging.WARNING, logger="icd"), pytest.raises(ICDError, match="the file is damaged"):
        graph({"x": torch.ones(1, 4)})
    assert caplog.records == []  # the cache is not blamed for a graph that does not compile at all


def test_icd_cache_lists_and_prunes_compiled_graphs(export):
    folder, spec = export
    cached = ov_engine.compiled_cache(folder, spec, F32, name="model")
    assert cached is not None
    (cached / "1.blob").write_bytes(b"x" * 3000)
    listing = CliRunner().invoke(main, ["cache", "list", "--json"])
    assert listing.exit_code == 0, listing.output
    (entry,) = [e for e in json.loads(listing.stdout)["entries"] if e["kind"] == "openvino"]
    assert entry["name"] == "model" and entry["bytes"] >= 3000 and entry["path"] == str(cached.parent)
    old = 1_000_000.0
    for path in [cached.parent, *cached.parent.rglob("*")]:
        os.utime(path, (old, old))
    pruned = CliRunner().invoke(main, ["cache", "prune", "--kind", "openvino"])
    assert pruned.exit_code == 0, pruned.output
    assert "removed openvino graphs model" in pruned.output and not cached.parent.exists()


def test_graphs_over_the_size_bound_are_compiled_anew_each_time(export, monkeypatch):
    # an SD1.5 UNet imported from the cache gained no time and held its compiled size more in resident memory
    folder, spec = export
    size = sum(path.stat().st_size for path in spec.files(folder))
    monkeypatch.setattr(ov_engine, "CACHED_GRAPH_BYTES", size)
    assert ov_engine.kept_compiled(folder, spec, F32) == ov_engine.compiled_cache(folder, spec, F32) is not None
    monkeypatch.setattr(ov_engine, "CACHED_GRAPH_BYTES", size - 1)
    assert ov_engine.kept_compiled(folder, spec, F32) is None
    (folder / spec.external_data).unlink()
    assert ov_engine.kept_compiled(folder, spec, F32) is None  # a missing file: OpenVinoGraph says so in one line


def test_other_settings_unused_for_a_month_are_removed(export):
    # after an engine upgrade or a CPU change, the old copies of the weights go once no run has used them for 30 days
    folder, spec = export
    old = ov_engine.compiled_cache(folder, spec, BF16)
    assert old is not None
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    fp32 = ov_engine.compiled_cache(folder, spec, F32)
    assert fp32 is not None and fp32.is_dir() and not old.exists()
    again = ov_engine.compiled_cache(folder, spec, BF16)
    assert again is not None and fp32.is_dir()  # used just now: kept
