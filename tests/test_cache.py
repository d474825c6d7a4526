"""icd cache list|prune over a cache laid out as icd writes it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from icdcli.cli.main import main
from icdcli.core.paths import USED_MARKER, cache_root


def _entry(kind: str, key: str, name: str, days_old: float, size: int = 1000) -> None:
    folder = cache_root() / kind / key
    folder.mkdir(parents=True)
    (folder / ("icd.json" if kind == "merged" else "manifest.json")).write_text(json.dumps({"name": name}))
    (folder / "weights.safetensors").write_bytes(b"x" * size)
    stamp = time.time() - days_old * 86400
    for path in (*folder.iterdir(), folder):
        os.utime(path, (stamp, stamp))


def test_list_and_prune_by_last_use():
    _entry("merged", "old", "old-model", 40)
    _entry("merged", "recent", "recent-model", 2)
    _entry("onnx", "export", "old-model", 60, size=5000)
    _entry("merged", "busy", "busy-model", 0)
    listing = CliRunner().invoke(main, ["cache", "list", "--json"])
    assert listing.exit_code == 0, listing.output
    report = json.loads(listing.stdout)
    assert [e["name"] for e in report["entries"]] == ["old-model", "old-model", "recent-model", "busy-model"]
    assert report["bytes"] >= 8000 and report["root"] == str(cache_root())
    dry = CliRunner().invoke(main, ["cache", "prune", "--older-than", "30", "--dry-run"])
    assert dry.exit_code == 0 and "would free" in dry.output and (cache_root() / "merged" / "old").is_dir()
    pruned = CliRunner().invoke(main, ["cache", "prune", "--older-than", "30"])
    assert pruned.exit_code == 0, pruned.output
    assert sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["busy", "recent"]
    assert not (cache_root() / "onnx" / "export").exists()
    everything = CliRunner().invoke(main, ["cache", "prune", "--all"])
    assert everything.exit_code == 0 and sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["busy"]


def test_a_marker_refreshes_last_use():
    _entry("merged", "used", "used-model", 90)
    (cache_root() / "merged" / "used" / USED_MARKER).touch()
    pruned = CliRunner().invoke(main, ["cache", "prune", "--older-than", "30"])
    assert pruned.exit_code == 0 and (cache_root() / "merged" / "used").is_dir()


def test_loading_a_cached_fused_model_marks_it_used(sd15_parts):
    from icdcli.models.sources import ModelRequest, load_requested_model

    request = ModelRequest(None, str(sd15_parts.base), str(sd15_parts.teacher_pt), str(sd15_parts.forward_lora),
                           str(sd15_parts.reverse_lora))  # fmt: skip
    load_requested_model(request)
    (cached,) = (cache_root() / "merged").iterdir()
    assert not (cached / USED_MARKER).exists()
    load_requested_model(request)
    assert (cached / USED_MARKER).is_file()


def test_a_model_that_runs_in_float16_is_cached_in_float16(sd15_parts):
    import torch
    from safetensors import safe_open

    from icdcli.models.sources import ModelRequest, load_requested_model

    parts = (
        str(sd15_parts.base),
        str(sd15_parts.teacher_pt),
        str(sd15_parts.forward_lora),
        str(sd15_parts.reverse_lora),
    )
    half = load_requested_model(ModelRequest(None, *parts, half=True))
    full = load_requested_model(ModelRequest(None, *parts))
    folders = {p.name: p for p in (cache_root() / "merged").iterdir()}
    assert len(folders) == 2 and sum(name.endswith("-fp16") for name in folders) == 1
    cached = next(p for name, p in folders.items() if name.endswith("-fp16"))
    with safe_open(str(cached / "reverse_unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
    with safe_open(str(cached / "vae" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float32  # the VAE stays float32
    said = []
    load_requested_model(ModelRequest(None, *parts, half=True), progress=said.append)
    assert not any("fusing" in message for message in said)  # read from the float16 cache
    # the fused weights agree with the float32 fusion to float16's precision
    for a, b in zip(half.reverse_unet.parameters(), full.reverse_unet.parameters(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=2e-3, atol=1e-4)


def test_prune_to_a_size_removes_the_least_recently_used_first():
    _entry("merged", "oldest", "a", 9, size=4000)
    _entry("onnx", "middle", "b", 5, size=3000)
    _entry("merged", "newer", "c", 1, size=2000)
    _entry("merged", "busy", "d", 0, size=8000)  # in use: kept whatever the size
    dry = CliRunner().invoke(main, ["cache", "prune", "--max-size", "12K", "--dry-run"])  # 17 KB in all
    assert dry.exit_code == 0, dry.output
    assert "would remove fused model a" in dry.output and "would remove onnx export b" in dry.output
    assert "fused model c" not in dry.output and (cache_root() / "merged" / "oldest").is_dir()
    kept = CliRunner().invoke(main, ["cache", "prune", "--max-size", "12000"])  # c and d fit: 10 KB
    assert kept.exit_code == 0 and sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["busy", "newer"]
    assert not (cache_root() / "onnx" / "middle").exists() and "left, over" not in kept.output
    tight = CliRunner().invoke(main, ["cache", "prune", "--max-size", "1k"])
    assert tight.exit_code == 0 and sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["busy"]
    assert "over --max-size 1.0 KB: entries in use in the last 2 minutes are kept" in tight.output


def test_prune_to_a_size_within_one_kind_and_with_an_age():
    _entry("onnx", "export", "a", 3, size=6000)
    _entry("merged", "fused", "b", 40, size=1000)
    _entry("merged", "recent", "c", 2, size=6000)
    pruned = CliRunner().invoke(main, ["cache", "prune", "--max-size", "0", "--kind", "onnx"])
    assert pruned.exit_code == 0 and not (cache_root() / "onnx" / "export").exists()
    assert sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["fused", "recent"]  # other kinds untouched
    both = CliRunner().invoke(main, ["cache", "prune", "--max-size", "1G", "--older-than", "30"])
    assert both.exit_code == 0 and sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["recent"]


def test_a_size_that_is_not_one_is_a_usage_error():
    for bad in ("lots", "20X", "-5G", "1e3"):
        result = CliRunner().invoke(main, ["cache", "prune", "--max-size", bad])
        assert result.exit_code == 2 and "is not a size" in result.output, (bad, result.output)


def test_graphs_prepared_from_an_export_that_is_gone_are_pruned_whatever_their_age(tmp_path):
    export = cache_root() / "onnx" / "model-0123-fp32"
    _entry("onnx", export.name, "model", 2)
    for kind, key, source in (("onnxruntime", "live", export), ("openvino", "orphan", tmp_path / "gone-export"),
                              ("onnxruntime", "unknown", None)):  # fmt: skip
        _entry(kind, key, "model", 2)
        if source is not None:
            (cache_root() / kind / key / "source.json").write_text(json.dumps({"export": str(source)}))
            os.utime(cache_root() / kind / key, (time.time() - 2 * 86400,) * 2)
    listing = json.loads(CliRunner().invoke(main, ["cache", "list", "--json"]).stdout)
    assert {Path(e["path"]).name: e["orphaned"] for e in listing["entries"]} == {
        export.name: False, "live": False, "orphan": True, "unknown": False}  # fmt: skip
    assert "model (export gone)" in CliRunner().invoke(main, ["cache", "list"]).output
    pruned = CliRunner().invoke(main, ["cache", "prune"])  # 30 days by default: only the orphan goes
    assert pruned.exit_code == 0 and "removed openvino graphs model (1.1 KB, its export is gone)" in pruned.output
    assert not (cache_root() / "openvino" / "orphan").exists()
    assert (cache_root() / "onnxruntime" / "live").is_dir() and (cache_root() / "onnxruntime" / "unknown").is_dir()


def test_the_max_size_setting_removes_the_least_recently_used_idle_entries(monkeypatch):
    from icdcli.io.cache_entries import keep_within_max_size

    _entry("merged", "old", "a", 9, size=50_000)
    _entry("onnx", "older", "b", 20, size=50_000)
    _entry("merged", "busy", "c", 0, size=50_000)
    said: list[str] = []
    keep_within_max_size(said.append)  # not set: nothing
    monkeypatch.setenv("ICD_CACHE_MAX_SIZE", "110K")
    keep_within_max_size(said.append)
    assert said == [f"note: removed 1 least recently used cache entries (48.8 KB) to keep {cache_root()} within "
                    "ICD_CACHE_MAX_SIZE=110.0 KB"]  # fmt: skip
    assert sorted(p.name for p in (cache_root() / "merged").iterdir()) == ["busy", "old"]
    assert not (cache_root() / "onnx" / "older").exists()


def test_commands_that_load_a_model_keep_the_max_size(tmp_path, monkeypatch):
    _entry("onnx", "older", "b", 20, size=50_000)
    monkeypatch.setenv("ICD_CACHE_MAX_SIZE", "0")  # everything idle goes; what this run fuses is in use
    out = tmp_path / "edit.png"
    example = Path(__file__).parent.parent / "examples" / "red-circle.png"
    args = ["edit", str(example), "--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue "
            "background", "-o", str(out), "--backend", "torch"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and out.is_file(), result.output
    assert "least recently used cache entries" in result.stderr and not (cache_root() / "onnx" / "older").exists()
    assert any((cache_root() / "merged").iterdir())  # the model this run fused stays
    monkeypatch.setenv("ICD_CACHE_MAX_SIZE", "lots")
    bad = CliRunner().invoke(main, [*args, "--overwrite"])
    assert bad.exit_code == 1 and "ICD_CACHE_MAX_SIZE='lots': 'lots' is not a size" in bad.stderr, bad.output


def test_sizes_are_read_as_people_write_them():
    from icdcli.core.paths import parse_size

    assert parse_size("20G") == 20 * 2**30 and parse_size("500m") == 500 * 2**20 and parse_size("1.5TiB") == 3 * 2**39
    assert parse_size("4096") == 4096 and parse_size(" 0 ") == 0 and parse_size("2KB") == 2048


def test_an_export_in_use_is_marked_used_so_pruning_by_age_keeps_it(tmp_path):
    """An export made 40 days ago and used today stays; an export in a folder of the user's gets no marker."""
    pytest.importorskip("onnxruntime")
    example = Path(__file__).parent.parent / "examples" / "red-circle.png"
    args = ["edit", str(example), "--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue "
            "background", "--backend", "onnxruntime"]  # fmt: skip
    assert CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.png")]).exit_code == 0
    (export,) = (cache_root() / "onnx").iterdir()
    stamp = time.time() - 40 * 86400
    for path in (*export.rglob("*"), export):
        os.utime(path, (stamp, stamp))
    assert CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b.png")]).exit_code == 0  # the lean load reads it
    assert (export / USED_MARKER).is_file()
    pruned = CliRunner().invoke(main, ["cache", "prune", "--older-than", "30", "--kind", "onnx"])
    assert pruned.exit_code == 0 and export.is_dir(), pruned.output

    own = tmp_path / "my-export"
    assert CliRunner().invoke(main, ["export", "--out", str(own)]).exit_code == 0
    result = CliRunner().invoke(main, ["export", "--out", str(own)])  # current: found, not made again
    assert result.exit_code == 0 and not (own / USED_MARKER).exists()


def test_graphs_prepared_from_an_export_in_use_are_in_use_too(monkeypatch):
    """A load marks its export; the graphs prepared from it are marked only when an edit first runs them."""
    from icdcli.io.cache_entries import keep_within_max_size

    _entry("onnx", "export", "model", 0, size=1000)  # marked by this load
    _entry("onnxruntime", "optimized", "model", 5, size=50_000)
    (cache_root() / "onnxruntime" / "optimized" / "source.json").write_text(
        json.dumps({"export": str(cache_root() / "onnx" / "export")})
    )
    _entry("merged", "other", "other", 3, size=50_000)
    monkeypatch.setenv("ICD_CACHE_MAX_SIZE", "0")
    keep_within_max_size(lambda line: None)
    assert (cache_root() / "onnxruntime" / "optimized").is_dir() and not (cache_root() / "merged" / "other").exists()
    pruned = CliRunner().invoke(main, ["cache", "prune", "--all", "--kind", "onnxruntime"])
    assert pruned.exit_code == 0 and (cache_root() / "onnxruntime" / "optimized").is_dir(), pruned.output


def test_prune_counts_what_it_removed_exits_1_when_a_removal_fails_and_never_follows_a_link(tmp_path, monkeypatch):
    import shutil

    _entry("merged", "old", "old-model", 40)
    _entry("onnx", "stuck", "stuck-export", 40)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("keep")
    link = cache_root() / "merged" / "link"
    link.symlink_to(outside)
    stamp = time.time() - 40 * 86400
    for path in (outside / "mine.txt", outside):
        os.utime(path, (stamp, stamp))
    os.utime(link, (stamp, stamp), follow_symlinks=False)
    real_rmtree = shutil.rmtree

    def stuck(path, *args, **kwargs):
        if Path(path).name == "stuck":
            raise PermissionError(13, "Permission denied")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stuck)
    pruned = CliRunner().invoke(main, ["cache", "prune", "--all"])
    assert pruned.exit_code == 1 and "1 of 3 entries could not be removed" in pruned.stderr, pruned.output
    assert "freed" in pruned.stdout and "(2 entries)" in pruned.stdout
    assert not os.path.lexists(link) and (outside / "mine.txt").read_text() == "keep"
    assert (cache_root() / "onnx" / "stuck").is_dir() and not (cache_root() / "merged" / "old").exists()
