"""Invert once, edit many: an inversion is a value (`icd invert` writes it, `icd edit --latents` decodes it), and
its edits are pixel-identical to whole edits with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.diffusion.recipe import P2POptions, SamplerSettings, resolve_edit
from icdcli.editing.edits import edit
from icdcli.editing.inversion import InversionError, edit_inversion, invert_for_edit, load_inversion, save_inversion
from icdcli.io.images import load_image, read_record

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"
OTHER_TARGET = "a green circle on a blue background"


@pytest.fixture(scope="module")
def model():
    from icdcli.pipeline import ICDEditPipeline

    return ICDEditPipeline.from_pretrained(device="cpu").model


def _settings(model, method: str, p2p: P2POptions | None = None):
    return resolve_edit(model.info.edit, model.info.generate_guidance, method=method, p2p=p2p)


CASES = {
    "swap": ("swap", None, "source"),
    "swap-unguided-target": ("swap", None, "target"),
    "p2p": ("p2p", None, "source"),
    "p2p-blend": ("p2p", P2POptions(blend_target=("circle",)), "source"),
    "p2p-blend-keep-inversion": ("p2p", P2POptions(blend=("red", "yellow"), blend_keep="inversion"), "source"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_python_edit_of_an_inversion_equals_the_whole_edit(model, case, tmp_path):
    method, options, unguided = CASES[case]
    resolved = _settings(model, method, options)
    settings = SamplerSettings("icd", 50, 3)
    image = load_image(EXAMPLE)
    whole = edit(model, image, SOURCE, TARGET, guidance=resolved.guidance, tau=resolved.tau, settings=settings,
                 p2p=resolved.p2p, unguided=unguided)  # fmt: skip
    inversion = invert_for_edit(model, image, SOURCE, settings)
    save_inversion(inversion, tmp_path / "x.safetensors")
    for value in (inversion, load_inversion(tmp_path / "x.safetensors")):  # in memory, and through its file
        edited = edit_inversion(model, value, TARGET, guidance=resolved.guidance, tau=resolved.tau,
                                settings=settings, p2p=resolved.p2p, unguided=unguided)  # fmt: skip
        assert edited.size == image.size
        assert np.array_equal(np.asarray(edited), np.asarray(whole)), case


def test_the_unguided_prompt_changes_a_swap(model):
    resolved = _settings(model, "swap")
    settings = SamplerSettings("icd", 50, 0)
    inversion = invert_for_edit(model, load_image(EXAMPLE), SOURCE, settings)
    kept, edited = (
        np.asarray(edit_inversion(model, inversion, TARGET, guidance=resolved.guidance, tau=resolved.tau,
                                  settings=settings, unguided=unguided)).astype(int)
        for unguided in ("source", "target")
    )  # fmt: skip
    assert np.abs(kept - edited).max() > 0
    with pytest.raises(ValueError, match="unguided"):
        edit_inversion(model, inversion, TARGET, guidance=4.0, tau=0.8, settings=settings, unguided="both")


def test_the_source_is_encoded_once_and_every_target_once(model, monkeypatch):
    calls: list[list[str]] = []
    encode = model.encode_prompt

    def counting(text):
        calls.append([text] if isinstance(text, str) else list(text))
        return encode(text)

    monkeypatch.setattr(model, "encode_prompt", counting)
    settings = SamplerSettings("icd", 50, 0)
    resolved = _settings(model, "p2p")
    inversion = invert_for_edit(model, load_image(EXAMPLE), SOURCE, settings)
    assert calls == [[SOURCE]]
    for target in (TARGET, OTHER_TARGET):
        edit_inversion(model, inversion, target, guidance=resolved.guidance, tau=resolved.tau, settings=settings,
                       p2p=resolved.p2p)  # fmt: skip
    assert calls == [[SOURCE], [TARGET], [OTHER_TARGET]]  # the source's encoding is cached with the inversion
    calls.clear()
    edit(model, load_image(EXAMPLE), SOURCE, TARGET, guidance=resolved.guidance, tau=resolved.tau, settings=settings)
    assert calls == [[SOURCE], [TARGET]]  # a whole edit: the same text-encoder batches


def test_an_inversion_made_otherwise_is_refused(model, merged_dir):
    from dataclasses import replace

    from icdcli.models.runtime import load_merged

    settings = SamplerSettings("icd", 50, 0)
    inversion = invert_for_edit(model, load_image(EXAMPLE), SOURCE, settings)
    kwargs = {"guidance": 4.0, "tau": 0.8}
    with pytest.raises(InversionError, match="another model"):
        edit_inversion(load_merged(merged_dir), inversion, TARGET, settings=settings, **kwargs)
    with pytest.raises(InversionError, match="sampler"):
        edit_inversion(model, inversion, TARGET, settings=SamplerSettings("ddim", 10, 0), **kwargs)
    with pytest.raises(InversionError, match="working size"):
        edit_inversion(model, replace(inversion, size=(64, 64)), TARGET, settings=settings, **kwargs)
    with pytest.raises(InversionError, match="boundaries"):
        edit_inversion(model, replace(inversion, forward_boundaries=(1, 2, 3)), TARGET, settings=settings, **kwargs)


# --- the command line ----------------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


CLI_CASES = {
    "swap": ["--method", "swap"],
    "swap-unguided-target": ["--method", "swap", "--unguided-prompt", "target", "--guidance", "6"],
    "p2p": [],
    "p2p-blend": ["--blend-tgt", "circle", "--tau", "0.6"],
    "ddim-swap": ["--method", "swap", "--sampler", "ddim", "--ddim-steps", "10"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
@pytest.mark.slow
def test_icd_edit_latents_equals_icd_edit(case, tmp_path):
    flags = CLI_CASES[case]
    whole = _run("edit", EXAMPLE, "--src", SOURCE, "--tgt", TARGET, "-o", tmp_path / "whole.png", "--seed", 3,
                 "--device", "cpu", *flags)  # fmt: skip
    assert whole.exit_code == 0, whole.output
    latents = tmp_path / "circle.latent.safetensors"
    sampler = flags[flags.index("--sampler") :] if "--sampler" in flags else []
    inverted = _run("invert", EXAMPLE, "--prompt", SOURCE, "-o", latents, "--seed", 3, "--device", "cpu", *sampler)
    assert inverted.exit_code == 0, inverted.output
    decode_flags = [flag for flag in flags if flag not in sampler]  # the sampler is the inversion's
    edited = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", "--json", *decode_flags)
    assert edited.exit_code == 0, edited.output
    line = json.loads(edited.stdout.splitlines()[-1])
    out = tmp_path / "circle-edit.png"  # beside the latents, named after them
    assert line["status"] == "done" and line["output"] == str(out)
    assert np.array_equal(_pixels(out), _pixels(tmp_path / "whole.png")), case
    # the record is the whole edit's (same input, prompts and settings), plus the latent file it came from
    recorded, expected = read_record(out), read_record(tmp_path / "whole.png")
    assert recorded.pop("latents") == latents.name
    assert recorded == expected
    again = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", *decode_flags)
    assert again.exit_code == 0 and "skipped" in again.output  # made already with these parameters


def test_the_latent_file_holds_the_value_and_its_record(tmp_path):
    latents = tmp_path / "l.safetensors"
    result = _run("invert", EXAMPLE, "--prompt", SOURCE, "-o", latents, "--device", "cpu")
    assert result.exit_code == 0, result.output
    inversion = load_inversion(latents)
    assert inversion.prompt == SOURCE and inversion.settings.seed == 0 and inversion.settings.sampler == "icd"
    assert inversion.size == (32, 32) and inversion.original_size == Image.open(EXAMPLE).size
    assert inversion.model_hash.startswith("sha256:") and inversion.forward_boundaries
    assert inversion.record["command"] == "invert" and inversion.record["model_hash"] == inversion.model_hash
    assert tuple(inversion.latents.shape) == (1, 4, 16, 16)  # the embedded model's 16x16 latents


@pytest.mark.slow
def test_icd_edit_latents_refuses_what_it_cannot_use(tmp_path, merged_dir):
    latents = tmp_path / "l.safetensors"
    assert _run("invert", EXAMPLE, "--prompt", SOURCE, "-o", latents, "--device", "cpu").exit_code == 0
    cases = {
        "another model": ["--model", merged_dir],
        "sampler": ["--sampler", "ddim"],
    }
    for expected, flags in cases.items():
        result = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", "-o", tmp_path / "o.png",
                      *flags)  # fmt: skip
        assert result.exit_code == 1, result.output
        message = result.output.strip().splitlines()[-1]
        assert expected in message and "invert" in message, message
    assert not (tmp_path / "o.png").exists()
    usage = {
        "--src": ["--src", "a blue circle on a red background"],
        "--seed": ["--seed", "5"],
        "no IMAGE": [EXAMPLE],
    }
    for expected, flags in usage.items():
        result = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", *flags)
        assert result.exit_code == 2 and expected in result.output, result.output
    assert _run("edit", "--latents", latents, "--device", "cpu").exit_code == 2  # no --tgt
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a safetensors file")
    old = tmp_path / "old.safetensors"
    from safetensors.torch import save_file

    save_file({"latents": load_inversion(latents).latents}, str(old), {"prompt": SOURCE})  # an older icd's file
    missing = tmp_path / "missing.safetensors"
    for path, expected in ((foreign, "not a latent file"), (old, "older icd invert"), (missing, "no such file")):
        result = _run("edit", "--latents", path, "--tgt", TARGET, "--device", "cpu")
        assert result.exit_code == 1 and expected in result.output, result.output
    from safetensors import safe_open

    with safe_open(str(latents), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    damaged = {  # a hand-edited file: one line saying so, never a traceback or a 10-gigapixel image
        "width -5": ({"original_width": "-5"}, {}, "image size -5x"),
        "10 gigapixels": ({"original_width": "100000", "original_height": "100000"}, {}, "image size 100000x100000"),
        "two latents": ({}, {"latents": tensors["latents"].repeat(2, 1, 1, 1)}, "not one image's"),
        "trajectory": (
            {},
            {name: x[..., :2, :2].contiguous() for name, x in tensors.items() if name != "latents"},
            "trajectory",
        ),
        "bell": ({"prompt": "a \x07 circle"}, {}, "control character"),
    }
    for name, (meta, swapped, expected) in damaged.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({**tensors, **swapped}, str(path), {**metadata, **meta})
        result = _run("edit", "--latents", path, "--tgt", TARGET, "--device", "cpu", "-o", tmp_path / "o.png")
        assert result.exit_code == 1 and "Traceback" not in result.output, (name, result.output)
        assert expected in result.output and "invert the image again" in result.output, (name, result.output)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_icd_edit_latents_never_replaces_what_it_did_not_make(tmp_path):
    latents = tmp_path / "l.safetensors"
    assert _run("invert", EXAMPLE, "--prompt", SOURCE, "-o", latents, "--device", "cpu").exit_code == 0
    mine = tmp_path / "mine.png"
    Image.new("RGB", (8, 8)).save(mine)
    before = mine.read_bytes()
    result = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", "-o", mine)
    assert result.exit_code == 1 and "--overwrite" in result.output, result.output
    assert mine.read_bytes() == before
    first = _run("edit", "--latents", latents, "--tgt", TARGET, "--device", "cpu", "-o", tmp_path / "e.png")
    assert first.exit_code == 0, first.output
    other = _run("edit", "--latents", latents, "--tgt", OTHER_TARGET, "--device", "cpu", "-o", tmp_path / "e.png")
    assert other.exit_code == 1 and "tgt" in other.output, other.output  # another edit's output: refused


@pytest.mark.slow
def test_unguided_prompt_is_recorded_and_repeated(tmp_path):
    out = tmp_path / "e.png"
    flags = ["--src", SOURCE, "--tgt", TARGET, "--method", "swap", "--device", "cpu"]
    result = _run("edit", EXAMPLE, *flags, "--unguided-prompt", "target", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_record(out)["unguided_prompt"] == "target"
    clash = _run("edit", EXAMPLE, *flags, "-o", out)  # the source's unguided steps: another edit
    assert clash.exit_code == 1 and "unguided_prompt" in clash.output, clash.output
    repeated = _run("edit", "--from", out, "-o", tmp_path / "again.png", "--device", "cpu")
    assert repeated.exit_code == 0, repeated.output
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(out))
    assert read_record(tmp_path / "again.png")["unguided_prompt"] == "target"


@pytest.mark.parametrize("target", [TARGET, SOURCE])
def test_edits_with_a_negative_prompt_equal_whole_edits(merged_model, target, monkeypatch):
    """Where guided steps need a negative prompt (real CFG), it is encoded with the new targets, or alone when the
    target is the source (a reconstruction): the same in both paths, and once per edit."""
    model = merged_model
    monkeypatch.setattr(model, "needs_negative", lambda guidance: guidance != 1.0)
    calls: list[list[str]] = []
    encode = model.encode_prompt
    monkeypatch.setattr(
        model,
        "encode_prompt",
        lambda text: calls.append([text] if isinstance(text, str) else list(text)) or encode(text),
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    for sampler in (SamplerSettings("icd", 50, 1), SamplerSettings("ddim", 4, 1)):
        calls.clear()
        whole = edit(model, image, SOURCE, target, guidance=3.0, tau=0.8, settings=sampler)
        expected = [[SOURCE], [target], [""]] if target != SOURCE else [[SOURCE], [""]]
        assert calls == expected
        inversion = invert_for_edit(model, image, SOURCE, sampler)
        edited = edit_inversion(model, inversion, target, guidance=3.0, tau=0.8, settings=sampler)
        assert calls == expected + expected
        assert np.array_equal(np.asarray(edited), np.asarray(whole)), sampler
