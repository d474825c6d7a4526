"""One model identity: the fused-model cache key, the export fingerprint and the records' model hash."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

from icdcli.core.digests import file_sha256, file_stamp, files_sha256, json_sha256
from icdcli.models.identity import ModelIdentity, model_fingerprint, model_hash

INFO = {"name": "m", "family": "sd15", "forward_boundaries": [19, 259], "reverse_boundaries": [259, 999],
        "guidance_distilled": True, "scaling_factor": 0.18215}  # fmt: skip
FUSED = ModelIdentity(INFO, {"base": "/some/where", "teacher": "sha256:ab", "reverse_lora": "sha256:cd"})


def test_keys_keep_the_values_they_had_so_caches_and_records_stay_valid():
    # computed by the three definitions this module replaced (export/manifest.py, icdcli/run/batch.py)
    assert FUSED.fingerprint() == "3a29d4fc81ced45f9243cd8ba4fde0eb26205da639b04ae7aaedb352c9fcaffa"
    assert FUSED.record_hash() == "sha256:fec5942cfa26bf78a049d0730a8ffea566a7a038ab06f5f887891e22f6878bcd"


def test_the_record_hash_is_portable_and_the_fingerprint_local(tmp_path):
    moved = replace(FUSED, made_from={**FUSED.made_from, "base": "/else"})
    assert moved.record_hash() == FUSED.record_hash()  # the same files in another place: the same model
    assert moved.fingerprint() != FUSED.fingerprint()  # a cached export is this machine's
    other = replace(FUSED, made_from={**FUSED.made_from, "teacher": "sha256:ef"})
    assert other.record_hash() != FUSED.record_hash() and other.fingerprint() != FUSED.fingerprint()
    assert replace(FUSED, network={**INFO, "scaling_factor": 0.13025}).record_hash() != FUSED.record_hash()

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "icd.json").write_text("{}")
    (folder / "unet" / "w.safetensors").write_bytes(b"12345")
    loaded = ModelIdentity(INFO, {}, folder)
    hashed, printed = loaded.record_hash(), loaded.fingerprint()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # new file times
    os.utime(copy / "unet" / "w.safetensors", ns=(1, 1))
    assert replace(loaded, folder=copy).record_hash() == hashed
    os.utime(folder / "unet" / "w.safetensors", ns=(1, 1))
    assert loaded.fingerprint() != printed and loaded.record_hash() == hashed
    (folder / "unet" / "w.safetensors").write_bytes(b"123456")
    assert loaded.record_hash() != hashed


def test_a_model_in_memory_is_identified_by_its_weights():
    calls = []

    def weights() -> str:
        calls.append(1)
        return "w1"

    memory = ModelIdentity(INFO, {}, None, weights)
    assert memory.fingerprint() != replace(memory, weights=lambda: "w2").fingerprint() and calls == [1]
    FUSED.fingerprint()
    assert replace(FUSED, weights=weights).fingerprint() == FUSED.fingerprint() and calls == [1]  # not read
    with pytest.raises(ValueError, match="weights"):
        ModelIdentity(INFO).fingerprint()


def test_a_fused_model_and_its_cached_folder_are_one_model(sd15_parts, merged_model, merged_dir):
    from icdcli.models.fusion import LoraSources, fuse_lora_model

    parts = sd15_parts
    fused = fuse_lora_model(LoraSources(parts.base, parts.teacher_pt, parts.forward_lora, parts.reverse_lora))
    assert model_fingerprint(fused) == model_fingerprint(merged_model)
    assert model_hash(fused) == model_hash(merged_model)
    assert fused.info.made_from["forward_lora"] == file_sha256(parts.forward_lora)
    assert ModelIdentity.of(merged_model).folder == merged_dir


def test_digest_helpers(tmp_path):
    import hashlib

    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"ab")
    second.write_bytes(b"c")
    assert files_sha256([first, second]) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # "abc"
    large = os.urandom(5 << 19)  # two and a half blocks
    first.write_bytes(large)
    assert file_sha256(first) == "sha256:" + hashlib.sha256(large).hexdigest()
    assert json_sha256({"b": 1, "a": [2]}) == json_sha256({"a": [2], "b": 1}) != json_sha256({"a": [2], "b": 2})
    os.utime(second, ns=(5, 7))
    assert file_stamp(second) == [str(second.resolve()), 1, 7] and file_stamp(second, name="b")[0] == "b"
