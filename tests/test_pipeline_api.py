"""The pipeline class in diffusers' conventions: dtype and device, generators, step callbacks, progress bars,
batches, its output, quiet loading, `from_pipe`, and the package's lazy export."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from icdcli.diffusion.recipe import P2POptions
from icdcli.io.images import load_image
from icdcli.models.sources import DEFAULT_MODEL_DIR
from icdcli.pipeline import ICDEditOutput, ICDEditPipeline

EXAMPLES = DEFAULT_MODEL_DIR.parent.parent / "examples"
SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return ICDEditPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    """Three inputs: two of one working size, and a wide one of another."""
    circle = load_image(EXAMPLES / "red-circle.png")
    square = load_image(EXAMPLES / "green-square.png")
    wide = ImageOps.pad(circle, (128, 64), color=(20, 40, 200))
    return [circle, square, wide]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _same(first: Image.Image, second: Image.Image) -> bool:
    return first.size == second.size and np.array_equal(_pixels(first), _pixels(second))


# 8-bit levels an image may move between a batch of one and a batch of several, and the share of its values that
# may move: float rounding of batched kernels (tests/test_throughput.py measured at most 1 level on PyTorch)
ROUNDING_LEVELS, ROUNDED_SHARE = 2, 0.01


def _same_up_to_rounding(first: Image.Image, second: Image.Image) -> bool:
    if first.size != second.size:
        return False
    difference = np.abs(_pixels(first) - _pixels(second))
    return difference.max() <= ROUNDING_LEVELS and (difference > 0).mean() < ROUNDED_SHARE


# --- dtype and device ---------------------------------------------------------------------------------------


def test_torch_dtype_is_honoured_and_dtype_stays_its_alias():
    with pytest.raises(ValueError, match="disagree"):
        ICDEditPipeline.from_pretrained(device="cpu", torch_dtype=torch.float16, dtype=torch.float32)
    pipe = ICDEditPipeline.from_pretrained(device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert next(pipe.model.reverse_unet.parameters()).dtype == torch.bfloat16
    alias = ICDEditPipeline.from_pretrained(device="cpu", dtype="bfloat16", torch_dtype="torch.bfloat16")
    assert alias.dtype == torch.bfloat16


def test_to_moves_and_returns_the_pipeline():
    pipe = ICDEditPipeline.from_pretrained(device="cpu")
    assert pipe.dtype == torch.float32
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and next(pipe.model.forward_unet.parameters()).dtype == torch.bfloat16
    assert pipe.to("cpu") is pipe and pipe.dtype == torch.bfloat16  # a device alone keeps the dtype
    assert pipe.to(device=torch.device("cpu"), dtype="float32").dtype == torch.float32
    assert next(pipe.model.text_encoders[0].parameters()).dtype == torch.float32
    assert pipe.to("cpu", torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        pipe.to(3)
    with pytest.raises(ValueError, match="names no torch dtype"):
        pipe.to(dtype="float17")


# --- seeds, generators and batches ----------------------------------------------------------------------------


def test_a_generator_gives_what_its_seed_gives(pipe, pictures):
    by_seed = pipe(pictures[0], SOURCE, TARGET, seed=7)
    by_generator = pipe(pictures[0], SOURCE, TARGET, generator=torch.Generator().manual_seed(7))
    assert by_generator.settings.seed == 7 and by_generator.seeds == [7]
    assert _same(by_generator[0], by_seed[0])
    assert pipe(pictures[0], SOURCE, TARGET).seeds == [pipe.model.info.edit.seed]  # the recipe's without either
    with pytest.raises(ValueError, match="not both"):
        pipe(pictures[0], SOURCE, TARGET, seed=1, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="one per image"):
        pipe(pictures[:2], SOURCE, TARGET, generator=[torch.Generator().manual_seed(1)])


@pytest.mark.slow
def test_a_list_is_edited_in_batches_as_each_alone(pipe, pictures, monkeypatch):
    import icdcli.editing.edits

    alone = [pipe(picture, SOURCE, TARGET, seed=seed)[0] for picture, seed in zip(pictures, (3, 4, 5), strict=True)]
    batches: list[int] = []
    batched = icdcli.editing.edits.edit_batch

    def counting(model, jobs, **kwargs):
        batches.append(len(jobs))
        return batched(model, jobs, **kwargs)

    monkeypatch.setattr(icdcli.editing.edits, "edit_batch", counting)
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4, 5)]
    together = pipe(pictures, SOURCE, TARGET, generator=generators)
    assert batches == [2, 1]  # the two 32x32 inputs in one network batch, the wide one in its own
    assert together.seeds == [3, 4, 5]
    assert [image.size for image in together] == [picture.size for picture in pictures]
    for mine, single in zip(together, alone, strict=True):
        assert _same_up_to_rounding(mine, single)
    assert _same(together[2], alone[2])  # a batch of one is the very call a single image makes
    batches.clear()
    one_at_a_time = pipe(pictures, SOURCE, TARGET, generator=generators, batch_size=1)
    assert batches == [1, 1, 1] and all(_same(a, b) for a, b in zip(one_at_a_time, alone, strict=True))
    reseeded = pipe(pictures, SOURCE, TARGET, generator=[torch.Generator().manual_seed(s) for s in (99, 4, 5)])
    assert not _same_up_to_rounding(reseeded[0], together[0])  # each image's own generator seeds its noise
    assert _same_up_to_rounding(reseeded[1], together[1])


def test_prompts_may_be_given_per_image(pipe, pictures):
    targets = [TARGET, "a red square on a blue background"]
    together = pipe(pictures[:2], [SOURCE, "a green square on a blue background"], targets, seed=2)
    second = pipe(pictures[1], "a green square on a blue background", targets[1], seed=2)
    assert _same_up_to_rounding(together[1], second[0])
    assert not _same_up_to_rounding(together[1], pipe(pictures[1], SOURCE, TARGET, seed=2)[0])
    with pytest.raises(ValueError, match="one per image"):
        pipe(pictures[:2], SOURCE, [TARGET], seed=2)
    with pytest.raises(ValueError, match="unicorn"):  # an error of one image's edit is raised, not returned
        pipe(pictures[:2], SOURCE, TARGET, p2p=P2POptions(blend_source=("unicorn",)))


def test_the_output_indexes_like_a_list_of_its_images(pipe, pictures):
    out = pipe(pictures, SOURCE, TARGET)
    assert isinstance(out, ICDEditOutput) and len(out) == 3 == len(out.images)
    assert out[0] is out.images[0] and out[-1] is out.images[2] and out[1:] == out.images[1:]
    assert list(out) == out.images and all(isinstance(image, Image.Image) for image in out)
    first, *_ = out
    assert first is out.images[0]


# --- step callbacks and the progress bar ----------------------------------------------------------------------


def test_callback_on_step_end_sees_each_decode_step_as_diffusers_calls_it(pipe, pictures):
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def record(caller, step, timestep, kwargs):
        assert caller is pipe and set(kwargs) == {"latents"}
        seen.append((step, timestep, tuple(kwargs["latents"].shape)))
        return kwargs

    plain = pipe(pictures[:2], SOURCE, TARGET)
    watched = pipe(pictures[:2], SOURCE, TARGET, callback_on_step_end=record)
    starts = sorted(pipe.model.info.reverse_boundaries, reverse=True)  # 999, 779, 519, 259
    assert [(step, timestep) for step, timestep, _ in seen] == list(enumerate(starts))
    assert all(shape[0] == 2 and len(shape) == 4 for _, _, shape in seen)  # the target rows of a P2P decode
    assert all(_same(a, b) for a, b in zip(watched, plain, strict=True))  # watching changes nothing
    seen.clear()
    pipe(pictures[0], SOURCE, TARGET, method="swap", callback_on_step_end=record)
    assert len(seen) == len(starts) and all(shape[0] == 1 for _, _, shape in seen)


@pytest.mark.parametrize("method", ["p2p", "swap"])
def test_latents_a_callback_returns_replace_the_samplers(pipe, pictures, method):
    def zero_at_the_end(caller, step, timestep, kwargs):
        if step == pipe.model.info.num_steps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    two = [pictures[0], pictures[1].resize(pictures[0].size)]
    plain = pipe(two, SOURCE, TARGET, method=method)
    zeroed = pipe(two, SOURCE, TARGET, method=method, callback_on_step_end=zero_at_the_end)
    assert _same(zeroed[0], zeroed[1])  # both decode the zero latent, whatever their inputs
    assert np.abs(_pixels(zeroed[0]) - _pixels(plain[0])).mean() > 1.0


def test_callback_arguments_are_checked(pipe, pictures):
    with pytest.raises(ValueError, match="tensor_inputs"):
        pipe(pictures[0], SOURCE, TARGET, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["x"])

    def misshapen(caller, step, timestep, kwargs):
        return {"latents": torch.zeros(3, 4, 2, 2)}

    with pytest.raises(ValueError, match="shape"):
        pipe(pictures[0], SOURCE, TARGET, callback_on_step_end=misshapen)


def test_the_progress_bar_counts_decode_steps_and_can_be_turned_off(pipe, pictures, capsys):
    pipe.set_progress_bar_config()
    pipe(pictures[0], SOURCE, TARGET)
    assert "decoding" not in capsys.readouterr().err  # stderr is no terminal here: no bar by default
    shown = io.StringIO()
    pipe.set_progress_bar_config(disable=False, file=shown)
    pipe(pictures, SOURCE, TARGET)
    steps = pipe.model.info.num_steps * 2  # two batches (two working sizes)
    assert f"{steps}/{steps}" in shown.getvalue()
    hidden = io.StringIO()
    pipe.set_progress_bar_config(disable=True, file=hidden)
    pipe(pictures[0], SOURCE, TARGET)
    assert hidden.getvalue() == ""
    pipe.set_progress_bar_config()


# --- invert once, edit many --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["p2p", "swap"])
def test_an_inversion_edits_as_a_whole_call_does(pipe, pictures, method):
    inversion = pipe.invert(pictures[0], SOURCE, generator=torch.Generator().manual_seed(7))
    assert inversion.settings.seed == 7 and inversion.prompt == SOURCE
    other = "a green circle on a blue background"
    for target in (TARGET, other):
        edited = pipe.edit(inversion, target, method=method)
        assert edited.settings.method == method and edited.seeds == [7] and edited[0].size == pictures[0].size
        assert _same(edited[0], pipe(pictures[0], SOURCE, target, seed=7, method=method)[0])
    assert not _same(pipe.edit(inversion, TARGET, method=method)[0], pipe.edit(inversion, other, method=method)[0])


def test_the_unguided_prompt_of_a_swap_can_be_the_target(pipe, pictures):
    inversion = pipe.invert(pictures[0], SOURCE, seed=3)
    by_target = pipe.edit(inversion, TARGET, method="swap", unguided="target")
    assert _same(by_target[0], pipe(pictures[0], SOURCE, TARGET, seed=3, method="swap", unguided="target")[0])
    assert not _same(by_target[0], pipe.edit(inversion, TARGET, method="swap")[0])


# --- quiet loading ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loading_prints_no_library_warnings_or_bars(sd15_parts, tmp_path):
    parts = sd15_parts
    code = textwrap.dedent(f"""
        import sys
        import diffusers.utils.logging as dlog, transformers.utils.logging as tlog
        from icdcli import ICDEditPipeline
        ICDEditPipeline.from_pretrained(device="cpu")
        pipe = ICDEditPipeline.from_pretrained(
            base={str(parts.base)!r}, teacher={str(parts.teacher_pt)!r}, forward_lora={str(parts.forward_lora)!r},
            reverse_lora={str(parts.reverse_lora)!r}, device="cpu")
        pipe.to(dtype="bfloat16")
        print("verbosity", dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled())
    """)
    env = {**__import__("os").environ, "ICD_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the fuse, the cache's write and read, .to(): none of their warnings or bars
    assert "verbosity 30 30 True" in result.stdout  # the libraries' own settings are given back after


# --- from_pipe ----------------------------------------------------------------------------------------------------


def _relative_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first.float() - second.float()).norm() / second.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def sd_pipeline(sd15_parts):
    from diffusers import StableDiffusionPipeline

    from icdcli.core.quiet import libraries_quieted

    with libraries_quieted():
        return StableDiffusionPipeline.from_pretrained(sd15_parts.base, safety_checker=None)


TINY_SOURCE, TINY_TARGET = "a red circle on a blue background", "a green circle on a blue background"


def test_from_pipe_shares_the_pipelines_parts_and_fuses_as_icd_does(sd_pipeline, sd15_parts, pictures):
    parts = sd15_parts
    unet_before = {key: value.clone() for key, value in sd_pipeline.unet.state_dict().items()}
    pipe = ICDEditPipeline.from_pipe(
        sd_pipeline, teacher=parts.teacher_pt, forward_lora=parts.forward_lora, reverse_lora=parts.reverse_lora
    )
    model = pipe.model
    assert model.vae is sd_pipeline.vae and model.text_encoders == [sd_pipeline.text_encoder]
    assert model.tokenizers == [sd_pipeline.tokenizer]
    assert model.info.family == "sd15" and model.info.guidance_distilled
    assert model.info.reverse_boundaries == (259, 519, 779, 999) and model.teacher_unet is None
    for role, by_hand in (("forward", parts.forward_by_hand), ("reverse", parts.reverse_by_hand)):
        fused, expected = getattr(model, f"{role}_unet").state_dict(), by_hand.state_dict()
        assert fused.keys() == expected.keys()
        assert max(_relative_difference(fused[key], expected[key]) for key in expected) < 1e-5
    after = sd_pipeline.unet.state_dict()
    assert all(torch.equal(after[key], value) for key, value in unet_before.items())  # the user's UNet is untouched
    loaded = ICDEditPipeline.from_pretrained(
        base=str(parts.base), teacher=str(parts.teacher_pt), forward_lora=str(parts.forward_lora),
        reverse_lora=str(parts.reverse_lora), device="cpu",
    )  # fmt: skip
    mine, theirs = pipe(pictures[0], TINY_SOURCE, TINY_TARGET), loaded(pictures[0], TINY_SOURCE, TINY_TARGET)
    # the two fusions agree to 1e-5 (above), so a pixel may round the other way (one level in 0.3% on an AMD EPYC)
    assert _same_up_to_rounding(mine[0], theirs[0]) and mine.settings == theirs.settings


def test_from_pipe_without_a_teacher_fuses_into_a_copy_of_the_pipelines_unet(sd_pipeline, sd15_parts, pictures):
    from icdcli.models.lora import fuse_lora, read_lora

    pipe = ICDEditPipeline.from_pipe(
        sd_pipeline, forward_lora=sd15_parts.forward_lora, reverse_lora=sd15_parts.reverse_lora, name="mine"
    )
    model = pipe.model
    assert model.teacher_unet is sd_pipeline.unet and not model.info.guidance_distilled
    assert model.info.name == "mine" and pipe.device == sd_pipeline.device and pipe.dtype == sd_pipeline.unet.dtype
    import copy

    expected = fuse_lora(copy.deepcopy(sd_pipeline.unet), read_lora(sd15_parts.reverse_lora)).state_dict()
    fused = model.reverse_unet.state_dict()
    assert model.reverse_unet is not sd_pipeline.unet
    assert all(torch.equal(fused[key], value) for key, value in expected.items())
    out = pipe(pictures[0], TINY_SOURCE, TINY_TARGET, sampler="ddim", ddim_steps=4, method="swap")
    assert out[0].size == pictures[0].size


def test_from_pipe_takes_an_sdxl_pipeline(sdxl_parts, pictures):
    from diffusers import StableDiffusionXLPipeline

    from icdcli.core.quiet import libraries_quieted

    with libraries_quieted():
        sdxl = StableDiffusionXLPipeline.from_pretrained(sdxl_parts.base)
    pipe = ICDEditPipeline.from_pipe(
        sdxl, teacher=sdxl_parts.teacher_pt, forward_lora=sdxl_parts.forward_lora,
        reverse_lora=sdxl_parts.reverse_lora,
    )  # fmt: skip
    model = pipe.model
    assert model.info.family == "sdxl" and model.text_encoders == [sdxl.text_encoder, sdxl.text_encoder_2]
    assert model.tokenizers == [sdxl.tokenizer, sdxl.tokenizer_2]
    out = pipe(pictures[0], TINY_SOURCE, TINY_TARGET)
    assert out.settings.method == "swap" and out[0].size == pictures[0].size
    with pytest.raises(TypeError, match="lacks"):
        ICDEditPipeline.from_pipe(object(), forward_lora=sdxl_parts.forward_lora, reverse_lora=sdxl_parts.reverse_lora)


# --- the package's export -----------------------------------------------------------------------------------------


def test_the_package_exports_the_pipeline_lazily():
    code = textwrap.dedent("""
        import sys
        import icdcli
        assert "icdcli.pipeline" not in sys.modules and "torch" not in sys.modules
        assert "ICDEditPipeline" in dir(icdcli)
        from icdcli import ICDEditOutput, ICDEditPipeline
        assert ICDEditPipeline.__module__ == "icdcli.pipeline" and ICDEditOutput.__module__ == "icdcli.pipeline"
        assert "torch" not in sys.modules
        try:
            icdcli.no_such_name
        except AttributeError:
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
