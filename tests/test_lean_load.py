"""The lean ONNX Runtime load: a current export runs without diffusers, transformers or onnx, and edits as the full
load.

The embedded model is exported once for the module (the first load finds no export and takes the full path); each
lean edit is compared byte for byte with the same edit made by the full load over the same export.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from icdcli.backends import graph_model
from icdcli.backends.accelerated import AcceleratedModel
from icdcli.backends.graph_model import DeferredTorchModel, TokenizerJson
from icdcli.cli.common import load_model
from icdcli.cli.main import main
from icdcli.models.identity import model_hash
from icdcli.models.runtime import ICDModel
from icdcli.models.sources import DEFAULT_MODEL_DIR

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SRC, TGT = "a red circle on a blue background", "a yellow circle on a blue background"
MODEL_LIBRARIES = ("diffusers", "transformers", "onnx")  # onnx: graphs are checked against their recorded sha256


def model_options(**overrides):
    options = dict(model=None, base=None, base_config=None, teacher=None, forward_lora=None, reverse_lora=None)
    return options | dict(device="cpu", precision="auto", low_memory=None) | overrides


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cache whose embedded-model export was made by the first load (with the teacher graph), and that load."""
    cache = tmp_path_factory.mktemp("lean-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ICD_CACHE_DIR", str(cache))
        loaded = load_model(model_options(), need_teacher=True, backend="onnxruntime")
    return cache, loaded


@pytest.fixture
def cache(exported, monkeypatch):
    monkeypatch.setenv("ICD_CACHE_DIR", str(exported[0]))
    return exported[0]


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    """The example at 2:1: its latents are not the P2P graph's, so P2P steps fall back to PyTorch."""
    from PIL import Image

    path = tmp_path_factory.mktemp("wide") / "wide.png"
    Image.open(EXAMPLE).resize((64, 32)).save(path)
    return path


def edit_args(image: Path, output: Path, *extra: str) -> list[str]:
    return ["edit", str(image), "--src", SRC, "--tgt", TGT, "-o", str(output), "--backend", "onnxruntime", *extra]


def run_edit(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def full_load_edit(monkeypatch, args: list[str]) -> None:
    """The edit as the full load makes it: the lean load declines."""
    with monkeypatch.context() as patch:
        patch.setattr(graph_model, "load_exported", lambda *args, **kwargs: None)
        run_edit(args)


@pytest.mark.slow
def test_a_missing_export_takes_the_full_path_and_exports(exported):
    cache, loaded = exported
    assert isinstance(loaded.model, AcceleratedModel) and isinstance(loaded.model.model, ICDModel)
    (manifest,) = cache.glob("onnx/*/manifest.json")
    assert "teacher_unet" in json.loads(manifest.read_text())["graphs"]


@pytest.mark.slow
def test_lean_edits_import_no_model_library_and_match_the_full_load(cache, tmp_path, monkeypatch):
    outputs = {method: (tmp_path / f"lean-{method}.png", tmp_path / f"full-{method}.png") for method in ("swap", "p2p")}
    runs = [edit_args(EXAMPLE, lean, "--method", method) for method, (lean, _) in outputs.items()]
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom icdcli.cli.main import main\n"
        f"for args in {runs!r}:\n"
        "    result = CliRunner().invoke(main, args)\n    assert result.exit_code == 0, result.output\n"
        f"print(','.join(name for name in {MODEL_LIBRARIES!r} if name in sys.modules))"
    )
    env = {**os.environ, "ICD_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "", f"imported {result.stdout.strip()}"
    for method, (lean, full) in outputs.items():
        full_load_edit(monkeypatch, edit_args(EXAMPLE, full, "--method", method))
        assert lean.read_bytes() == full.read_bytes(), method


@pytest.mark.slow
def test_lean_model_answers_as_the_full_load(cache):
    lean = load_model(model_options(), need_teacher=False, backend="onnxruntime").model
    full = load_model(model_options(), need_teacher=False, backend=None).model
    assert isinstance(lean, AcceleratedModel) and isinstance(lean.model, DeferredTorchModel)
    assert lean.info.to_json() == full.info.to_json() and lean.source == full.source
    assert model_hash(lean) == model_hash(full)
    assert (lean.vae_scale_factor, lean.latent_channels) == (full.vae_scale_factor, full.latent_channels)
    for text in ("", SRC, " ".join([SRC] * 4)):
        assert lean.prompt_token_count(text) == full.prompt_token_count(text)
    assert lean.needs_negative(4.0) == full.needs_negative(4.0) and not lean.model.loaded


@pytest.mark.slow
def test_a_stale_export_is_not_used(cache):
    (manifest,) = cache.glob("onnx/*/manifest.json")
    text = manifest.read_text()
    try:
        manifest.write_text(json.dumps({**json.loads(text), "fingerprint": "0" * 64}))
        assert graph_model.load_exported(**_lean_arguments(need_teacher=False)) is None
    finally:
        manifest.write_text(text)
    assert graph_model.load_exported(**_lean_arguments(need_teacher=False)) is not None


def _lean_arguments(*, need_teacher: bool) -> dict:
    import torch

    from icdcli.models.sources import ModelRequest

    def must_not_load():
        raise AssertionError("the PyTorch model loaded")

    return dict(
        request=ModelRequest(), load=must_not_load, need_teacher=need_teacher, device=torch.device("cpu"),
        dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra", [("--method", "p2p"), ("--method", "p2p", "--sampler", "ddim", "--ddim-steps", "6")], ids=["wide", "ddim"]
)
@pytest.mark.slow
def test_what_needs_pytorch_loads_it_then_and_edits_as_the_full_load(
    cache, wide_image, tmp_path, monkeypatch, caplog, extra
):
    """P2P at latents the P2P graph was not exported for, and P2P on the teacher (no P2P teacher graph), hand their
    steps to PyTorch: the lean model loads it on the spot, and the edit is the full load's."""
    image = wide_image if "ddim" not in extra else EXAMPLE
    lean, full = tmp_path / "lean.png", tmp_path / "full.png"
    with caplog.at_level(logging.INFO, logger="icd"):
        run_edit(edit_args(image, lean, *extra))
    assert "loading the PyTorch model" in caplog.text
    full_load_edit(monkeypatch, edit_args(image, full, *extra))
    assert lean.read_bytes() == full.read_bytes()


@pytest.mark.slow
def test_the_teacher_asked_for_loads_the_model_once(cache):
    model = load_model(model_options(), need_teacher=True, backend="onnxruntime").model
    assert isinstance(model.model, DeferredTorchModel) and not model.model.loaded
    assert model.parts.teacher is not None  # the teacher runs from its graph
    assert model.teacher_unet is not None and model.model.loaded
    assert model.model.torch_model("again") is model.model.torch_model("again")


@pytest.mark.slow
def test_a_user_merged_folder_loads_lean_once_exported(merged_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    options = model_options(model=str(merged_dir))
    first = load_model(options, need_teacher=False, backend="onnxruntime").model
    second = load_model(options, need_teacher=False, backend="onnxruntime").model
    assert isinstance(first.model, ICDModel) and isinstance(second.model, DeferredTorchModel)
    assert second.info.to_json() == first.info.to_json() and model_hash(second) == model_hash(first)
    assert (second.vae_scale_factor, second.latent_channels) == (first.vae_scale_factor, first.latent_channels)


# --- the tokenizer ---------------------------------------------------------------------------------------


def _shapes_captions() -> list[str]:
    from icdcli.training.scenes import COLOURS, SHAPES

    return [
        f"a {colour} {shape} on a {background} background"
        for colour, shape, background in itertools.product(COLOURS, SHAPES, COLOURS)
        if colour != background
    ]


ODD_PROMPTS = [
    "",
    " ",
    "a dalmatian on a red background",
    "A RED Circle, on a blue background!",
    "🙂 ünïcode ☃",
    "a red circle on a blue background " * 6,
    "<|startoftext|> a red circle <|endoftext|>",
]
CALLS = [
    dict(padding="max_length", truncation=True, return_tensors="pt"),
    dict(truncation=False),
    dict(truncation=True),
    dict(truncation=True, return_offsets_mapping=True, return_special_tokens_mask=True),
    dict(add_special_tokens=False),
]


def _saved_tokenizers(folder: Path) -> list[Path]:
    """Folders holding the embedded model's tokenizer, a sub-word CLIP-like one and transformers' CLIP tokenizer."""
    from transformers import CLIPTokenizer

    from icdcli.training.tokenizer import build_subword_tokenizer

    build_subword_tokenizer(
        ["a", "red", "circle"], {"dalmatian": ["dal", "mat", "ian"]}, max_length=12
    ).save_pretrained(folder / "subword")
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [
        *letters,
        *(f"{letter}</w>" for letter in letters),
        "re",
        "red</w>",
        "ci",
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\nc i\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=10).save_pretrained(
        folder / "clip"
    )
    return [DEFAULT_MODEL_DIR / "pipeline" / "tokenizer", folder / "subword", folder / "clip"]


def _same(ours, theirs) -> bool:
    import torch

    if isinstance(theirs, torch.Tensor):
        return torch.equal(ours, theirs)
    return [list(item) if isinstance(item, tuple) else item for item in ours] == [
        list(item) if isinstance(item, tuple) else item for item in theirs
    ]


def test_tokenizer_json_gives_the_transformers_ids(tmp_path):
    from transformers import AutoTokenizer

    for folder in _saved_tokenizers(tmp_path):
        ours, theirs = TokenizerJson.from_folder(folder), AutoTokenizer.from_pretrained(folder)
        assert ours is not None, folder
        assert ours.model_max_length == theirs.model_max_length
        for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "all_special_ids"):
            assert getattr(ours, name) == getattr(theirs, name), (folder, name)
        for prompt, call in itertools.product(_shapes_captions() + ODD_PROMPTS, CALLS):
            if "padding" in call:
                call = call | {"max_length": theirs.model_max_length}
            mine, reference = ours(prompt, **call), theirs(prompt, **call)
            for key in ("input_ids", "attention_mask", "offset_mapping", "special_tokens_mask"):
                if key in reference:
                    assert _same(mine[key], reference[key]), (folder.name, prompt, call, key)
            if "return_tensors" not in call:
                decoded = theirs.decode(reference["input_ids"], skip_special_tokens=True)
                assert ours.decode(mine["input_ids"], skip_special_tokens=True) == decoded
        batch = ["a red circle", "", "a red circle on a blue background " * 3]
        call = dict(padding="max_length", max_length=theirs.model_max_length, truncation=True, return_tensors="pt")
        assert _same(ours(batch, **call).input_ids, theirs(batch, **call).input_ids)


def test_a_folder_without_tokenizer_json_has_no_lean_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    assert TokenizerJson.from_folder(tmp_path) is None
