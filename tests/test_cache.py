"""icd cache list|prune over a cache laid out as icd writes it."""

from __future__ import annotations

import json
import os
import time

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
