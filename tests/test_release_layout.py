"""The release's own files load under their own names: tiny models written in the released layout (PEFT
LoRA keys, a pickled teacher state dict) under the released file names, for both families and all three
boundary sets, with and without the family prefix, loose or as a tarball unpacks.

Every way of naming the same files must give the same edit, pixel for pixel, as icd's own hyphenated
names: the names carry only the boundaries, never the weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main

SETS = {
    "4steps_1": ((19, 259, 519, 779), (259, 519, 779, 999)),
    "4steps_2": ((19, 249, 499, 699), (249, 499, 699, 999)),
    "3steps": ((19, 339, 699), (339, 699, 999)),
}
PREFIX = {"sd15": "iCD-SD15", "sdxl": "iCD-SDXL"}
TEACHER = {"sd15": "sd15_cfg_distill.pt", "sdxl": "sdxl_cfg_distill.pt"}


def released_name(family: str, role: str, bounds: tuple[int, ...], prefix: bool = True) -> str:
    stem = f"{role}_{'_'.join(map(str, bounds))}.safetensors"
    return f"{PREFIX[family]}-{stem}" if prefix else stem


@pytest.fixture(scope="module", params=[(f, s) for f in ("sd15", "sdxl") for s in SETS], ids=lambda p: "-".join(p))
def release(request, tmp_path_factory):
    from tiny import make_parts

    family, name = request.param
    forward, reverse = SETS[name]
    root = tmp_path_factory.mktemp(f"release-{family}-{name}")
    parts = make_parts(root / "parts", family, forward=forward, reverse=reverse)
    tarball = root / f"{PREFIX[family]}_{name}"  # the folder a release tarball unpacks to
    tarball.mkdir()
    shutil.copy(parts.forward_lora, tarball / released_name(family, "forward", forward))
    shutil.copy(parts.reverse_lora, tarball / released_name(family, "reverse", reverse))
    shutil.copy(parts.teacher_pt, tarball / TEACHER[family])
    photo = root / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(photo)
    return family, forward, reverse, parts, tarball, photo


def _edit(photo, out, *flags) -> np.ndarray:
    args = ["edit", str(photo), "--src", "a red cat", "--tgt", "a blue cat", "-o", str(out), "--json", *map(str, flags)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out))


@pytest.mark.slow
def test_released_names_give_the_same_edit_as_hyphenated_names(release, tmp_path):
    family, forward, reverse, parts, tarball, photo = release
    reference = _edit(photo, tmp_path / "hyphen.png", "--base", parts.base, "--teacher", parts.teacher_pt,
                      "--forward-lora", parts.forward_lora, "--reverse-lora", parts.reverse_lora)  # fmt: skip
    assert parts.forward_lora.name.startswith("forward-")
    by_flags = _edit(photo, tmp_path / "flags.png", "--base", parts.base, "--teacher", tarball / TEACHER[family],
                     "--forward-lora", tarball / released_name(family, "forward", forward),
                     "--reverse-lora", tarball / released_name(family, "reverse", reverse))  # fmt: skip
    bare = tmp_path / "bare"
    bare.mkdir()
    for role, bounds, source in (("forward", forward, parts.forward_lora), ("reverse", reverse, parts.reverse_lora)):
        shutil.copy(source, bare / released_name(family, role, bounds, prefix=False))
    unprefixed = _edit(photo, tmp_path / "bare.png", "--base", parts.base, "--teacher", parts.teacher_pt,
                       "--forward-lora", bare / released_name(family, "forward", forward, prefix=False),
                       "--reverse-lora", bare / released_name(family, "reverse", reverse, prefix=False))  # fmt: skip
    by_folder = _edit(photo, tmp_path / "folder.png", "--model", tarball, "--base", parts.base)
    nested = tmp_path / "unpacked"
    shutil.copytree(tarball, nested / tarball.name)  # a tarball that unpacks into a folder of its own
    by_nested = _edit(photo, tmp_path / "nested.png", "--model", nested, "--base", parts.base)
    for other in (by_flags, unprefixed, by_folder, by_nested):
        assert np.array_equal(other, reference)


def test_a_release_folder_says_which_file_takes_each_role(release, tmp_path):
    family, forward, reverse, parts, tarball, photo = release
    result = CliRunner().invoke(
        main, ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "-o", str(tmp_path / "o.png"),
               "--model", str(tarball), "--base", str(parts.base)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in (released_name(family, "forward", forward), released_name(family, "reverse", reverse), TEACHER[family]):
        assert name in result.output


def test_release_folder_recipe_and_boundaries(release):
    from icdcli.diffusion.recipe import release_recipe
    from icdcli.models.sources import ModelRequest, load_requested_model

    family, forward, reverse, parts, tarball, _ = release
    model = load_requested_model(ModelRequest(model=str(tarball), base=str(parts.base)))
    assert (model.info.forward_boundaries, model.info.reverse_boundaries) == (forward, reverse)
    assert model.info.family == family and model.info.edit == release_recipe(family, reverse)
    expected_tau = 0.8 if family == "sd15" and reverse == (259, 519, 779, 999) else 0.7
    assert model.info.edit.tau == expected_tau and model.info.edit.guidance == 20.0
    assert model.info.edit.method == ("swap" if family == "sdxl" else "p2p")


def test_ambiguous_and_incomplete_release_folders(sd15_parts, tmp_path):
    from icdcli.core.errors import ModelSourceError
    from icdcli.models.sources import ModelRequest, load_requested_model

    folder = tmp_path / "two-forward"
    folder.mkdir()
    for bounds in ((19, 259, 519, 779), (19, 249, 499, 699)):
        shutil.copy(sd15_parts.forward_lora, folder / released_name("sd15", "forward", bounds))
    shutil.copy(sd15_parts.reverse_lora, folder / released_name("sd15", "reverse", (259, 519, 779, 999)))
    with pytest.raises(ModelSourceError, match="holds 2 forward files") as caught:
        load_requested_model(ModelRequest(model=str(folder), base=str(sd15_parts.base)))
    assert "forward_19_249_499_699" in str(caught.value) and "forward_19_259_519_779" in str(caught.value)
    lonely = tmp_path / "no-reverse"
    lonely.mkdir()
    shutil.copy(sd15_parts.forward_lora, lonely / released_name("sd15", "forward", (19, 259, 519, 779)))
    with pytest.raises(ModelSourceError, match="no reverse LoRA"):
        load_requested_model(ModelRequest(model=str(lonely), base=str(sd15_parts.base)))


def test_a_release_folder_without_base_names_the_family_pipeline(sd15_parts, tmp_path, monkeypatch):
    from icdcli.core.errors import ModelSourceError
    from icdcli.models.sources import ModelRequest, load_requested_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "iCD-SD15_4steps_1"
    folder.mkdir()
    shutil.copy(sd15_parts.forward_lora, folder / released_name("sd15", "forward", (19, 259, 519, 779)))
    shutil.copy(sd15_parts.reverse_lora, folder / released_name("sd15", "reverse", (259, 519, 779, 999)))
    with pytest.raises(ModelSourceError, match="stable-diffusion-v1-5/stable-diffusion-v1-5.*--base"):
        load_requested_model(ModelRequest(model=str(folder)))


def test_guidance_embedding_is_the_releases_embedding_of_w_minus_one():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from icdcli.diffusion.denoiser import guidance_scale_embedding
    from icdcli.diffusion.recipe import release_guidance

    for ours in (1.0, 8.0, 20.0):
        # the release embeds guidance_scale * 1000 with LCM's sinusoidal embedding (0 = unguided)
        release = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.tensor([release_guidance(ours)]), embedding_dim=512
        )
        torch.testing.assert_close(guidance_scale_embedding(torch.tensor([ours]), 512), release)
    assert release_guidance(20.0) == 19.0


def test_info_json_lists_every_preset_with_its_recipe():
    from icdcli.models.sources import PRESETS

    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert {"icd", "torch", "backends", "cache", "presets"} <= report.keys()
    assert [p["name"] for p in report["presets"]] == list(PRESETS)
    for preset in report["presets"]:
        assert {"name", "family", "boundaries", "method", "guidance", "tau", "cross_replace", "self_replace",
                "amplify", "seed"} <= preset.keys()  # fmt: skip
        assert set(preset["boundaries"]) == {"forward", "reverse"}
    sd15 = report["presets"][0]
    assert (sd15["name"], sd15["method"], sd15["guidance"], sd15["tau"]) == ("sd15", "p2p", 20.0, 0.8)
    assert (sd15["cross_replace"], sd15["self_replace"], sd15["amplify"], sd15["seed"]) == (0.3, 0.6, 4.0, 30)
    assert sd15["boundaries"] == {"forward": [19, 259, 519, 779], "reverse": [259, 519, 779, 999]}
