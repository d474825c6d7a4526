"""First contact with the hub: answers in seconds without a network, hub ids served from the local cache."""

from __future__ import annotations

import shutil
import time

import pytest

from icdcli.core.errors import ModelSourceError
from icdcli.models import hub
from icdcli.models.sources import ModelRequest, base_files, load_requested_model


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, and a hub endpoint on a local port nothing listens on: connections are refused."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_reachable", {})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))


def test_a_preset_without_network_fails_fast_with_the_fetch_commands(no_network):
    started = time.perf_counter()
    with pytest.raises(ModelSourceError) as caught:
        load_requested_model(ModelRequest(model="sd15"))
    elapsed = time.perf_counter() - started
    message = str(caught.value)
    assert "no network: 127.0.0.1 did not answer" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download dbaranchuk/icd-lora-sd15 iCD-SD15-forward_19_259_519_779.safetensors" in message
    assert "hf download alexnasa/Inverse-and-Edit sd15_cfg_distill.pt --local-dir icd-sd15" in message
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 model_index.json" in message
    assert "unet/diffusion_pytorch_model" not in message  # the base's UNet weights are not needed
    assert "--model icd-sd15 --base icd-sd15/base" in message
    assert elapsed < 20, elapsed  # a refused connection, no retries (without the probe: a minute of retries)


def test_offline_mode_says_so(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set"):
        load_requested_model(ModelRequest(model="sd15-3step"))


def test_base_files_are_the_few_icd_reads():
    assert "text_encoder_2/model.safetensors" in base_files("sdxl") and "tokenizer_2/vocab.json" in base_files("sdxl")
    assert not any("_2/" in name for name in base_files("sd15"))
    assert not any(name.startswith("unet/diffusion") for name in base_files("sd15"))


def _cached_repo(cache, repo: str, source_folder) -> None:
    """Lay `source_folder` out as huggingface_hub's cache holds a downloaded repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source_folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_a_hub_id_model_loads_from_the_hub_cache(monkeypatch, tmp_path, merged_dir):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _cached_repo(cache, "someone/tiny-icd", merged_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = load_requested_model(ModelRequest(model="someone/tiny-icd"))
    assert model.info.reverse_boundaries == (259, 519, 779, 999)
    with pytest.raises(ModelSourceError, match="hf download someone/absent --local-dir absent"):
        load_requested_model(ModelRequest(model="someone/absent"))


def test_a_hub_id_holding_a_release_tarball(monkeypatch, tmp_path, sd15_parts):
    import huggingface_hub.constants

    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(sd15_parts.forward_lora, release / "iCD-SD15-forward_19_259_519_779.safetensors")
    shutil.copy(sd15_parts.reverse_lora, release / "iCD-SD15-reverse_259_519_779_999.safetensors")
    shutil.copy(sd15_parts.teacher_pt, release / "sd15_cfg_distill.pt")
    cache = tmp_path / "hub"
    _cached_repo(cache, "someone/icd-release", release)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = load_requested_model(ModelRequest(model="someone/icd-release", base=str(sd15_parts.base)))
    assert model.info.edit.guidance == 20.0 and model.info.edit.method == "p2p"


@pytest.mark.parametrize("network", ["offline", "refused"])
def test_first_contact_with_a_preset_answers_in_under_two_seconds_before_torch_loads(tmp_path, network):
    """`icd edit --model sd15` with a fresh cache and no network: before, torch and diffusers were imported (6.8-10 s
    on a busy machine) before the preset's files were looked for. The bound is generous (the check takes ~0.4 s)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "photo.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "ICD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None)
    if network == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the connection is refused
    code = (
        "import sys\nfrom icdcli.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported', code)\n"
    )
    args = ["edit", str(tmp_path / "photo.png"), "--src", "a cat", "--tgt", "a dog", "--model", "sd15"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.stdout.strip() == "torch not imported 1", (result.stdout, result.stderr)
    commands = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("hf download")]
    assert len(commands) == 3 and all("&&" not in command for command in commands), result.stderr
    assert commands[1].startswith("hf download dbaranchuk/icd-lora-sd15 iCD-SD15-forward_19_259_519_779")
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    print(f"first contact, {network}: {elapsed:.2f} s")
