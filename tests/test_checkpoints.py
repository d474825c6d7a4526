"""The `parameters` chunk names the checkpoint and LoRAs by AutoV2 hash (what A1111, ComfyUI readers and civitai
resolve), each file hashed once and its digest cached by path, size and modification time."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from click.testing import CliRunner
from PIL import Image

import icdcli.io.hash_cache
from icdcli.cli.main import main
from icdcli.io.hash_cache import cached_file_sha256
from icdcli.io.images import read_record
from icdcli.models.checkpoints import ModelFiles, autov2, files_of
from icdcli.run.outputs import a1111_parameters


def _autov2(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_an_edit_from_parts_names_the_teacher_and_the_loras_by_autov2(sd15_parts, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(photo)
    out = tmp_path / "edit.png"
    parts = sd15_parts
    result = CliRunner().invoke(main, ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "-o", str(out),
                                       "--base", str(parts.base), "--teacher", str(parts.teacher_pt),
                                       "--forward-lora", str(parts.forward_lora), "--reverse-lora",
                                       str(parts.reverse_lora), "--method", "swap"])  # fmt: skip
    assert result.exit_code == 0, result.output
    details = Image.open(out).text["parameters"].split("\n")[1]
    assert f"Model hash: {_autov2(parts.teacher_pt)}, Model: teacher_cfg_distill," in details
    loras = f"{parts.forward_lora.stem}: {_autov2(parts.forward_lora)}, {parts.reverse_lora.stem}: " + _autov2(
        parts.reverse_lora
    )
    assert details.endswith(f'Lora hashes: "{loras}"'), details
    record = read_record(out)  # icd's own identity is kept where icd reads it
    assert record["model_hash"].startswith("sha256:") and _autov2(parts.teacher_pt) not in record["model_hash"]


def test_a_single_file_base_is_the_checkpoint_hashed_once(tmp_path, monkeypatch):
    checkpoint = tmp_path / "dreamshaper_8.safetensors"
    checkpoint.write_bytes(os.urandom(100_000))
    converted = tmp_path / "bases" / "abc"
    converted.mkdir(parents=True)
    (converted / "source.json").write_text(json.dumps({"name": checkpoint.name, "source": str(checkpoint)}))
    reads = []
    real = icdcli.io.hash_cache.files_sha256
    monkeypatch.setattr(icdcli.io.hash_cache, "files_sha256", lambda paths: reads.append(paths) or real(paths))
    made_from = {"base": str(converted), "forward_lora": "sha256:" + "1" * 64, "reverse_lora": "sha256:" + "2" * 64}
    files = files_of(made_from, "m")
    assert files.checkpoint == ("dreamshaper_8", _autov2(checkpoint))
    assert files.loras == (("m-forward", "1" * 10), ("m-reverse", "2" * 10))  # names not recorded: the roles
    assert files_of(made_from, "m") == files and len(reads) == 1  # the second edit reads nothing
    # a teacher, when there is one, is the checkpoint (its UNet is what runs)
    with_teacher = files_of({**made_from, "teacher": "sha256:" + "a" * 64, "teacher_name": "sd15_cfg_distill.pt"})
    assert with_teacher.checkpoint == ("sd15_cfg_distill", "a" * 10) and len(reads) == 1
    # a diffusers folder as it is, or a converted base whose file is gone: no checkpoint
    assert files_of({"base": str(tmp_path)}).checkpoint is None
    checkpoint.unlink()
    assert files_of(made_from).checkpoint is None


def test_the_hash_cache_rereads_a_file_that_changed_and_survives_a_read_only_cache(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"a" * 5000)
    cache = tmp_path / "cache" / "hashes.json"
    reads = []
    real = icdcli.io.hash_cache.files_sha256
    monkeypatch.setattr(icdcli.io.hash_cache, "files_sha256", lambda paths: reads.append(paths) or real(paths))
    first = cached_file_sha256(path, cache_file=cache)
    assert first == hashlib.sha256(b"a" * 5000).hexdigest() and len(reads) == 1
    assert cached_file_sha256(path, cache_file=cache) == first and len(reads) == 1
    stored = json.loads(cache.read_text())
    assert list(stored) == [str(path.resolve())] and stored[str(path.resolve())][2] == first
    path.write_bytes(b"b" * 5000)  # same size, new contents and time
    os.utime(path, ns=(1, 1))
    assert cached_file_sha256(path, cache_file=cache) == hashlib.sha256(b"b" * 5000).hexdigest() and len(reads) == 2
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    assert cached_file_sha256(path, cache_file=blocked / "hashes.json") == hashlib.sha256(b"b" * 5000).hexdigest()


def test_parameters_keep_a1111s_layout():
    record = {"tgt": "a dog", "steps": 4, "sampler": "icd", "guidance": 20.0, "seed": 30, "input_size": [512, 512],
              "model": "/models/sd15", "model_hash": "sha256:" + "f" * 64, "src": "a cat", "method": "p2p",
              "tau": 0.8}  # fmt: skip
    files = ModelFiles(("sd15_cfg_distill", "0123456789"), (("fwd", "aaaaaaaaaa"), ("rev", "bbbbbbbbbb")))
    text = a1111_parameters(record, files)
    assert text == (
        "a dog\nSteps: 4, Sampler: iCD, CFG scale: 20.0, Seed: 30, Size: 512x512, Model hash: 0123456789, "
        "Model: sd15_cfg_distill, Source prompt: a cat, Edit method: p2p, Dynamic guidance tau: 0.8, Lora hashes: "
        '"fwd: aaaaaaaaaa, rev: bbbbbbbbbb"'
    )
    bare = a1111_parameters(record)  # nothing known of the files: icd's own hash is not passed off as one
    assert "Model hash" not in bare and "ffffffffff" not in bare and "Model: sd15," in bare
    assert autov2("sha256:" + "c" * 64) == "c" * 10 == autov2("c" * 64)
