"""`--base FILE`: a whole pipeline in one LDM-layout `.safetensors` file, converted once with local configs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ldm_layout import copy_configs, write_single_file
from PIL import Image
from safetensors.torch import save_file
from test_hub import _cached_repo

from icdcli.cli.main import main
from icdcli.core.errors import ModelSourceError
from icdcli.models import single_file
from icdcli.models.single_file import checkpoint_family, config_files, find_config

SD15_REPO, SDXL_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.fixture(scope="module")
def single(sd15_parts, tmp_path_factory):
    """The tiny SD1.5 base as one LDM-layout file, alone in its folder, and its configs without weights."""
    folder = tmp_path_factory.mktemp("single-file")
    (folder / "checkpoint").mkdir()
    path = write_single_file(sd15_parts.base, folder / "checkpoint" / "tiny-sd15.safetensors")
    return path, copy_configs(sd15_parts.base, folder / "config")


def _edit(photo, out, base, parts, *extra):
    args = ["edit", photo, "--src", "a red circle", "--tgt", "a blue square", "-o", out, "--base", base,
            "--teacher", parts.teacher_pt, "--forward-lora", parts.forward_lora, "--reverse-lora", parts.reverse_lora,
            *extra, "--json"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out))


@pytest.mark.slow
def test_a_single_file_base_edits_exactly_as_its_folder(single, sd15_parts, tmp_path, monkeypatch):
    path, config = single
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photo)
    from_folder = _edit(photo, tmp_path / "folder.png", sd15_parts.base, sd15_parts)
    from_file = _edit(photo, tmp_path / "file.png", path, sd15_parts, "--base-config", config)
    assert from_folder.std() > 1 and np.array_equal(from_file, from_folder)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(single_file, "_from_single_file", no_second_conversion)
    again = _edit(photo, tmp_path / "again.png", path, sd15_parts, "--base-config", config)
    assert np.array_equal(again, from_folder)
    listing = json.loads(CliRunner().invoke(main, ["cache", "list", "--json"]).output)
    assert [entry["name"] for entry in listing["entries"] if entry["kind"] == "bases"] == [path.name]


def test_configs_beside_the_file_or_in_the_hub_cache_are_found(single, tmp_path, monkeypatch):
    import huggingface_hub.constants

    path, config = single
    beside = tmp_path / "repo"
    copy_configs(config, beside)
    (beside / path.name).symlink_to(path)
    assert find_config(beside / path.name, "sd15", SD15_REPO) == beside
    cache = tmp_path / "hub"
    _cached_repo(cache, SD15_REPO, config)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    found = find_config(path, "sd15", SD15_REPO)
    assert (found / "unet" / "config.json").read_text() == (config / "unet" / "config.json").read_text()


def test_offline_without_configs_fails_fast_with_the_fetch_command(single, tmp_path, monkeypatch):
    import huggingface_hub.constants

    path, _ = single
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    started = time.perf_counter()
    args = ["edit", path, "--src", "a", "--tgt", "b", "--base", path, "--forward-lora", "f", "--reverse-lora", "r"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    command = f"hf download {SD15_REPO} model_index.json scheduler/scheduler_config.json unet/config.json"
    assert command in message and "tokenizer/vocab.json --local-dir stable-diffusion-v1-5-config" in message
    assert "HF_HUB_OFFLINE is set" in message and "--base-config stable-diffusion-v1-5-config" in message
    assert ".safetensors" not in message.split("hf download")[1].split("--local-dir")[0]  # configs only, no weights
    assert elapsed < 5, elapsed


def _header_only(path, names, conv_in_channels=4):
    """A safetensors file holding tiny tensors under `names`: enough for what is read from the header."""
    tensors = {name: torch.zeros(1) for name in names}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, conv_in_channels, 1, 1)
    save_file(tensors, str(path))
    return path


def test_the_family_is_read_from_the_header_and_sdxl_asks_for_its_own_configs(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    sdxl = _header_only(tmp_path / "xl.safetensors", ["conditioner.embedders.1.model.ln_final.weight"])
    assert checkpoint_family(sdxl) == "sdxl"
    with pytest.raises(ModelSourceError) as caught:
        find_config(sdxl, "sdxl", SDXL_REPO)
    assert f"hf download {SDXL_REPO} model_index.json" in str(caught.value)
    assert "tokenizer_2/vocab.json" in str(caught.value) and "text_encoder_2/config.json" in str(caught.value)
    assert "text_encoder_2/config.json" in config_files("sdxl") and "text_encoder_2" not in str(config_files("sd15"))


@pytest.mark.parametrize(
    ("names", "channels", "refusal"),
    [
        (["cond_stage_model.model.ln_final.weight"], 4, "Stable Diffusion 2"),
        (["cond_stage_model.transformer.text_model.x"], 9, "9 input channels"),
        (["conditioner.embedders.0.model.ln_final.weight"], 4, "refiner"),
    ],
)
def test_other_checkpoints_are_refused_by_name(tmp_path, names, channels, refusal):
    with pytest.raises(ModelSourceError, match=refusal):
        checkpoint_family(_header_only(tmp_path / "other.safetensors", names, channels))


def test_what_is_not_a_pipeline_file_is_refused(tmp_path, single):
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.base_model.model.conv_in.lora_A.weight": torch.zeros(1)}, str(lora))
    with pytest.raises(ModelSourceError, match="not a whole pipeline in one file"):
        checkpoint_family(lora)
    _, config = single
    partial = tmp_path / "partial-config"
    copy_configs(config, partial)
    (partial / "unet" / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="--base-config .* lacks unet/config.json"):
        find_config(lora, "sd15", SD15_REPO, given=partial)
