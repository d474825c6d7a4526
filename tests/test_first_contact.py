"""What a new user meets first: the embedded model and a photo, the files help and README name, the version,
and what `icd info` says about the hub and the presets."""

import json
import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from icdcli.cli.main import main
from icdcli.run.first_photo import looks_like_a_scene

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_the_embedded_models_scenes_are_scenes_and_photos_are_not():
    from icdcli.training.scenes import render_batch, scenes, to_uint8

    for size in (32, 128):
        rendered = to_uint8(render_batch(scenes("heldout", 100, seed=3, max_rotation=0.5), size)[0])
        assert all(looks_like_a_scene(Image.fromarray(pixels)) for pixels in rendered)
    for name in ("red-circle.png", "green-square.png"):
        assert looks_like_a_scene(Image.open(EXAMPLES / name))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 512)
    gradient = np.stack([*np.meshgrid(ramp, ramp[::-1]), np.full((512, 512), 90.0)], -1).astype(np.uint8)
    for index in range(20):  # photo-like: smooth fields of colour, with grain
        field = Image.fromarray(np.random.default_rng(index).integers(0, 255, (6, 8, 3), dtype=np.uint8))
        photo = np.asarray(field.resize((640, 480), Image.Resampling.BICUBIC), dtype=np.float64)
        grain = np.random.default_rng(index).normal(0, 8, photo.shape)
        assert not looks_like_a_scene(Image.fromarray(np.clip(photo + grain, 0, 255).astype(np.uint8)))
    for photo in (noise, Image.fromarray(gradient), Image.fromarray(gradient).convert("L").convert("RGB")):
        assert not looks_like_a_scene(photo)


def test_a_photo_through_the_embedded_model_is_told_once_before_the_edit(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / name)
    prompts = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]
    photos = CliRunner().invoke(main, ["edit", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), *prompts, "-o",
                                       str(tmp_path / "out")])  # fmt: skip
    assert photos.exit_code == 0, photos.output
    lines = photos.stderr.splitlines()
    notes = [index for index, line in enumerate(lines) if "embedded model knows only 32 px scenes" in line]
    assert len(notes) == 1, photos.stderr  # once per run, not per image
    written = [index for index, line in enumerate(lines) if line.startswith("wrote ")]
    assert notes[0] < written[0] and "--model sd15" in lines[notes[0]]
    assert any(line.strip().startswith("hf download dbaranchuk/icd-lora-sd15") for line in lines)
    scene = CliRunner().invoke(main, ["edit", str(EXAMPLES / "red-circle.png"), *prompts, "-o",
                                      str(tmp_path / "scene.png")])  # fmt: skip
    assert scene.exit_code == 0 and "32 px scenes" not in scene.stderr, scene.stderr


def _named_files(text: str) -> set[str]:
    """Repository files a text names: docs/..., examples/..., benchmarks/... and the like."""
    pattern = r"(?<![\w/.-])((?:docs|examples|benchmarks|tests|training|export|engines|icdcli)/[\w./-]+\.\w+)"
    return {match.rstrip(".") for match in re.findall(pattern, text)}


def _all_help(group, prefix=()):
    """The --help text of every command and group under `group`."""
    import click

    texts = [CliRunner().invoke(main, [*prefix, "--help"]).output]
    for name, command in getattr(group, "commands", {}).items():
        if isinstance(command, click.Group):
            texts += _all_help(command, (*prefix, name))
        else:
            texts.append(CliRunner().invoke(main, [*prefix, name, "--help"]).output)
    return texts


def test_every_file_the_help_the_readme_and_the_docs_name_exists():
    """Before, `icd edit --help` sent users to docs/batch.md, which did not exist, and docs/benchmarks.md and
    docs/engines.md to the deleted benchmarks/first-contact.sh."""
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert len(docs) >= 7  # the check reads every page
    texts = {"--help": "\n".join(_all_help(main)), "README.md": (ROOT / "README.md").read_text()}
    texts.update({f"docs/{page.name}": page.read_text() for page in docs})
    named = {where: _named_files(text) for where, text in texts.items()}
    assert "docs/batch.md" in named["--help"] and "docs/default-model.md" in named["README.md"]
    assert "benchmarks/gpu.sh" in named["docs/benchmarks.md"]  # the check sees what it must, docs included
    assert "benchmarks/first-contact.sh" in _named_files("replaced `benchmarks/first-contact.sh`.")
    outputs = {"examples/red-circle-edit.png"}  # what the README's first command writes
    missing = sorted(f"{where}: {name}" for where, names in named.items() for name in names - outputs
                     if not (ROOT / name).exists())  # fmt: skip
    assert not missing, missing
    links = re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#[\w-]+)?\)", (ROOT / "README.md").read_text())
    assert links and all((ROOT / link).is_file() for link in links), links


def test_the_version_is_the_installed_distributions():
    import importlib.metadata

    import icdcli

    assert icdcli.__version__ == importlib.metadata.version("icd")
    assert not re.search(r"__version__ = \"\d", (ROOT / "icdcli" / "__init__.py").read_text())  # no second number
    result = CliRunner().invoke(main, ["--version"])
    assert importlib.metadata.version("icd") in result.output


def test_info_says_where_the_hub_cache_is_whether_it_is_offline_and_which_presets_are_here(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # one file of the sd15 presets' LoRA repository in the cache, as the hub lays it out
    snapshot = hub_cache / "models--dbaranchuk--icd-lora-sd15" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "iCD-SD15-forward_19_259_519_779.safetensors").write_bytes(b"x")
    (hub_cache / "models--dbaranchuk--icd-lora-sd15" / "refs").mkdir()
    (hub_cache / "models--dbaranchuk--icd-lora-sd15" / "refs" / "main").write_text("abc")
    report = json.loads(CliRunner().invoke(main, ["info", "--json"]).stdout)
    assert report["hub"]["cache"] == str(hub_cache) and report["hub"]["offline"] is True
    sd15 = next(preset for preset in report["presets"] if preset["name"] == "sd15")
    assert sd15["files"]["present"] is False
    assert "dbaranchuk/icd-lora-sd15/iCD-SD15-forward_19_259_519_779.safetensors" not in sd15["files"]["missing"]
    assert "dbaranchuk/icd-lora-sd15/iCD-SD15-reverse_259_519_779_999.safetensors" in sd15["files"]["missing"]
    text = CliRunner().invoke(main, ["info"]).output
    assert f"hub cache: {hub_cache} (offline: HF_HUB_OFFLINE is set)" in text
    assert re.search(r"preset sd15: .*\n.*\n  files: missing \d+ of \d+", text), text
