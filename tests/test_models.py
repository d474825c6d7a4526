import json

import pytest
import torch

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding
from icdcli.diffusion.recipe import release_guidance
from icdcli.models.fusion import LoraSources
from icdcli.models.runtime import load_merged
from icdcli.models.sources import ModelRequest, load_requested_model


def _parts_request(parts, teacher=None, model=None):
    return ModelRequest(
        model=model,
        base=str(parts.base),
        teacher=str(teacher or parts.teacher_pt),
        forward_lora=str(parts.forward_lora),
        reverse_lora=str(parts.reverse_lora),
    )


def _assert_same_weights(ours, theirs, atol=1e-6):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    worst = max((a[key].float() - b[key].float()).abs().max().item() for key in a)
    assert worst <= atol, worst


def _probe(model, unet, family):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = 64 if family == "sdxl" else 32
    cond = Conditioning(
        PromptEmbedding(
            torch.randn(1, 12, hidden, generator=generator),
            torch.randn(1, 32, generator=generator) if family == "sdxl" else None,
        ),
        time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]]) if family == "sdxl" else None,
    )
    from icdcli.diffusion.denoiser import UNetDenoiser

    return UNetDenoiser(unet)(x, 519, cond, guidance=6.0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("teacher_format", ["pt", "safetensors"])
def test_parts_load_and_fuse_like_peft_merge(family, teacher_format, request):
    parts = request.getfixturevalue(f"{family}_parts")
    teacher = parts.teacher_pt if teacher_format == "pt" else parts.teacher_safetensors
    model = load_requested_model(_parts_request(parts, teacher))
    assert model.info.family == family
    assert model.info.guidance_distilled
    assert model.info.forward_boundaries == (19, 259, 519, 779)
    assert model.info.reverse_boundaries == (259, 519, 779, 999)
    assert model.info.made_from["forward_lora"].startswith("sha256:")
    assert len(model.text_encoders) == (2 if family == "sdxl" else 1)
    _assert_same_weights(model.forward_unet, parts.forward_by_hand)
    _assert_same_weights(model.reverse_unet, parts.reverse_by_hand)
    torch.testing.assert_close(
        _probe(model, model.reverse_unet, family), _probe(model, parts.reverse_by_hand, family), rtol=1e-5, atol=1e-5
    )
    # the LoRA really changed something: fused weights differ from the teacher
    assert not torch.allclose(_probe(model, model.reverse_unet, family), _probe(model, parts.teacher, family))


def test_fused_model_is_cached_and_reloaded_without_fusing(sd15_parts, monkeypatch, tmp_path):
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    first = load_requested_model(_parts_request(sd15_parts))
    cached = list((tmp_path / "merged").iterdir())
    assert len(cached) == 1 and (cached[0] / MODEL_JSON).is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the cached fused model should have been used")

    monkeypatch.setattr("icdcli.models.fusion.fuse_lora_model", refuse)
    second = load_requested_model(_parts_request(sd15_parts), need_teacher=True)
    _assert_same_weights(second.reverse_unet, first.reverse_unet, atol=0)
    _assert_same_weights(second.teacher_unet, sd15_parts.teacher, atol=0)
    assert first.teacher_unet is None, "the teacher is only kept in memory when asked for"


def test_merged_folder_round_trip(merged_dir, sd15_parts):
    data = json.loads((merged_dir / MODEL_JSON).read_text())
    assert data["format"] == "merged"
    assert data["forward_boundaries"] == [19, 259, 519, 779] and data["reverse_boundaries"] == [259, 519, 779, 999]
    assert data["guidance_distilled"] is True and data["scaling_factor"] == 0.5
    assert set(data["made_from"]) >= {"teacher", "forward_lora", "reverse_lora"}
    model = load_merged(merged_dir, need_teacher=True)
    _assert_same_weights(model.forward_unet, sd15_parts.forward_by_hand)
    _assert_same_weights(model.teacher_unet, sd15_parts.teacher, atol=0)
    assert load_merged(merged_dir).teacher_unet is None
    assert not any(path.suffix in (".bin", ".pt", ".pkl") for path in merged_dir.rglob("*"))


def test_lora_folder_format_with_relative_parts(sd15_parts, tmp_path):
    import shutil

    folder = tmp_path / "shipped"
    folder.mkdir()
    shutil.copytree(sd15_parts.base, folder / "pipeline")
    for path in (sd15_parts.teacher_safetensors, sd15_parts.forward_lora, sd15_parts.reverse_lora):
        shutil.copy(path, folder / path.name)
    (folder / MODEL_JSON).write_text(
        json.dumps({
            "format": "lora", "name": "shipped", "base": "pipeline", "teacher": sd15_parts.teacher_safetensors.name,
            "forward_lora": sd15_parts.forward_lora.name, "reverse_lora": sd15_parts.reverse_lora.name,
            "edit_guidance": 5.0, "tau": 0.75,
        })
    )  # fmt: skip
    model = load_requested_model(ModelRequest(model=str(folder)))
    assert (model.info.name, model.info.edit_guidance, model.info.tau) == ("shipped", 5.0, 0.75)
    _assert_same_weights(model.reverse_unet, sd15_parts.reverse_by_hand)


def test_lora_alpha_from_metadata_and_three_step_names(tmp_path):
    from tiny import make_parts

    parts = make_parts(tmp_path, "sd15", forward=(19, 339, 699), reverse=(339, 699, 999), rank=2, alpha=3.0)
    model = load_requested_model(_parts_request(parts))
    assert model.info.num_steps == 3 and model.info.tau == 0.7
    _assert_same_weights(model.forward_unet, parts.forward_by_hand)


def test_preset_offline_names_each_missing_file_and_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSourceError) as caught:
        load_requested_model(ModelRequest(model="sd15"))
    message = str(caught.value)
    for expected in (
        "--teacher", "sd15_cfg_distill.pt", "--forward-lora", "iCD-SD15-forward_19_259_519_779.safetensors",
        "--reverse-lora", "iCD-SD15-reverse_259_519_779_999.safetensors", "--base", "stable-diffusion-v1-5",
    ):  # fmt: skip
        assert expected in message
    first, *commands = message.splitlines()  # one line that says what is missing, then one fetch command per line
    assert "--forward-lora" in first and commands and all(c.startswith("  hf download ") for c in commands)
    with pytest.raises(ModelSourceError, match="--teacher"):
        load_requested_model(ModelRequest(model="sdxl"))


def test_preset_takes_local_paths_for_its_parts(sd15_parts):
    model = load_requested_model(_parts_request(sd15_parts, model="sd15"))
    assert (model.info.name, model.info.edit_guidance, model.info.tau) == ("sd15", 20.0, 0.8)
    assert release_guidance(model.info.edit_guidance) == 19.0  # the release script's guidance_scale 19


def test_bad_sources_give_clear_errors(sd15_parts, sdxl_parts, tmp_path):
    with pytest.raises(ModelSourceError, match="does not fit the base UNet"):
        load_requested_model(_parts_request(sd15_parts, teacher=sdxl_parts.teacher_pt))
    swapped = ModelRequest(
        base=str(sd15_parts.base), forward_lora=str(sd15_parts.reverse_lora), reverse_lora=str(sd15_parts.forward_lora)
    )
    with pytest.raises(ModelSourceError, match="swapped"):
        load_requested_model(swapped)
    unnamed = tmp_path / "adapter.safetensors"
    unnamed.write_bytes(sd15_parts.forward_lora.read_bytes())
    with pytest.raises(ModelSourceError, match="does not name its boundaries.*--forward-boundaries"):
        load_requested_model(
            ModelRequest(
                base=str(sd15_parts.base), forward_lora=str(unnamed), reverse_lora=str(sd15_parts.reverse_lora)
            )
        )
    with pytest.raises(ModelSourceError, match="neither a model folder nor a preset"):
        load_requested_model(ModelRequest(model="no-such-model"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_requested_model(ModelRequest(base=str(tmp_path / "nope"), forward_lora="a", reverse_lora="b"))


class NotWeights:
    pass


def test_pickled_objects_are_refused(sd15_parts, tmp_path):
    evil = tmp_path / "teacher.pt"
    torch.save({"weight": NotWeights()}, evil)
    with pytest.raises(ModelSourceError, match="holds Python objects besides tensors, which icd does not unpickle"):
        load_requested_model(_parts_request(sd15_parts, teacher=evil))


@pytest.mark.parametrize("part", ["base", "teacher", "forward_lora", "reverse_lora"])
def test_cache_key_changes_when_a_part_changes(sd15_parts, tmp_path, part):
    """Each part alone: its time, its size, its place change the key; a same-size, same-time rewrite cannot."""
    import os
    import shutil
    from dataclasses import replace

    (tmp_path / "base").mkdir()  # the key stamps the base by its model_index.json: copies, never the shared parts
    given = {"base": sd15_parts.base / "model_index.json", "teacher": sd15_parts.teacher_pt}
    given.update(forward_lora=sd15_parts.forward_lora, reverse_lora=sd15_parts.reverse_lora)
    copies = {name: tmp_path / ("base" if name == "base" else "") / path.name for name, path in given.items()}
    for name, path in given.items():
        shutil.copy2(path, copies[name])
    sources = LoraSources(tmp_path / "base", copies["teacher"], copies["forward_lora"], copies["reverse_lora"])
    changed = copies[part]
    stamp = changed.stat()
    before = sources.cache_key()

    def keep_time() -> None:
        os.utime(changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")  # same size, other content, the old time:
    keep_time()
    assert sources.cache_key() == before  # cheap keys cannot see it (fusing records the content)
    os.utime(changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # the time alone
    assert sources.cache_key() != before
    keep_time()
    assert sources.cache_key() == before
    changed.write_bytes(changed.read_bytes() + b" ")  # the size alone
    keep_time()
    assert sources.cache_key() != before
    changed.write_bytes(changed.read_bytes()[:-1])
    keep_time()
    assert sources.cache_key() == before
    elsewhere = tmp_path / "elsewhere" / changed.name  # the place alone: an identical copy with the same time
    elsewhere.parent.mkdir()
    shutil.copy2(changed, elsewhere)
    moved = {"base": elsewhere.parent, "teacher": elsewhere}.get(part, elsewhere)
    assert replace(sources, **{part: moved}).cache_key() != before
    assert replace(sources, cache_half=True).cache_key() == before + "-fp16"
