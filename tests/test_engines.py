"""Backends: AcceleratedModel on onnxruntime against PyTorch, backend selection, TensorRT's pure logic.

Edit tolerance, in pixels: at most 2 levels of 255 anywhere in the image. Every graph agrees with PyTorch to
~1e-6 relative (see test_export); eight UNet evaluations, the DDIM jumps and the VAE decoder carry that
into pixel values that differ by ~1e-5 of a level, and quantising to uint8 can then flip a value that sits on
a rounding boundary by one level. 2 levels is that plus headroom; a real error (wrong guidance, prompt or
scaling) moves pixels by tens of levels.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from icdcli.backends.accelerated import AcceleratedModel, BackendFacts, accelerate, choose_backend, select_backend
from icdcli.core.errors import ICDError
from icdcli.diffusion.denoiser import Conditioning, ControlledEps, PromptEmbedding, UNetDenoiser
from icdcli.diffusion.recipe import SamplerSettings
from icdcli.editing.edits import edit
from icdcli.editing.generation import generate
from icdcli.engines import tensorrt as trt_engine
from icdcli.engines import tensorrt_lib as trt_lib
from icdcli.engines import tensorrt_plan as trt_plan
from icdcli.engines.base import GraphDenoiser, ShapeNotCovered
from icdcli.export.manifest import P2P_CONTROL_INPUTS, GraphSpec, Manifest, TensorSpec

PIXEL_LEVELS = 2


def scene() -> Image.Image:
    pixels = np.full((32, 32, 3), (30, 60, 200), dtype=np.uint8)
    pixels[8:24, 8:24] = (220, 40, 40)
    return Image.fromarray(pixels)


def pixel_gap(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


# --- onnxruntime end to end -------------------------------------------------------------------------------

onnx_needed = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="needs onnxruntime and onnx (pip install 'icd[onnx]')",
)


@pytest.fixture(scope="module")
def ort_sd15(merged_model, tmp_path_factory):
    from test_export import exported

    return accelerate(merged_model, "onnxruntime", export_dir=exported(tmp_path_factory, merged_model, "sd15"))


@onnx_needed
@pytest.mark.slow
def test_accelerated_model_delegates_and_reports_backend(ort_sd15, merged_model):
    assert isinstance(ort_sd15, AcceleratedModel) and ort_sd15.backend == "onnxruntime"
    assert ort_sd15.info is merged_model.info and ort_sd15.tokenizers is merged_model.tokenizers
    assert ort_sd15.forward_denoiser.backend == "onnxruntime"
    assert ort_sd15.teacher_denoiser.backend == "onnxruntime"
    with pytest.raises(ICDError):
        ort_sd15.to("cpu")


@onnx_needed
@pytest.mark.slow
def test_cpu_sessions_block_instead_of_spinning(ort_sd15):
    """One thread pool per session: pools that spin after their run take the CPU from the next session's run."""
    for runner in ort_sd15.parts.runners.values():
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@onnx_needed
@pytest.mark.parametrize("sampler", ["icd", "ddim"])
@pytest.mark.slow
def test_edit_on_onnxruntime_matches_torch(ort_sd15, merged_model, sampler):
    settings = SamplerSettings(sampler, ddim_steps=10, seed=3)
    args = (scene(), "a red square on a blue background", "a green square on a blue background")
    options = {"guidance": 7.0, "tau": 0.8, "settings": settings}
    assert pixel_gap(edit(ort_sd15, *args, **options), edit(merged_model, *args, **options)) <= PIXEL_LEVELS


@onnx_needed
@pytest.mark.slow
def test_generate_on_onnxruntime_matches_torch(ort_sd15, merged_model):
    options = {"guidance": 8.0, "tau": 1.0, "settings": SamplerSettings(seed=1)}
    assert pixel_gap(generate(ort_sd15, "a cat", **options), generate(merged_model, "a cat", **options)) <= PIXEL_LEVELS


@onnx_needed
@pytest.mark.slow
def test_sdxl_edit_on_onnxruntime_matches_torch(sdxl_parts, tmp_path_factory):
    from test_export import exported, sdxl_model

    model = sdxl_model(sdxl_parts)
    fast = accelerate(model, "onnxruntime", export_dir=exported(tmp_path_factory, model, "sdxl"))
    args = (scene(), "a red square", "a green square")
    options = {"guidance": 8.0, "tau": 0.7, "settings": SamplerSettings(seed=0)}
    assert pixel_gap(edit(fast, *args, **options), edit(model, *args, **options)) <= PIXEL_LEVELS


@onnx_needed
@pytest.mark.slow
def test_cfg_model_runs_batch_two_on_guided_steps(merged_model, tmp_path_factory):
    from test_export import cfg_model, exported

    model = cfg_model(merged_model)
    fast = accelerate(model, "onnxruntime", export_dir=exported(tmp_path_factory, model, "sd15-cfg"))
    batches = []
    runner = fast.reverse_denoiser.runner
    fast.reverse_denoiser.runner = lambda feeds: batches.append(feeds["sample"].shape[0]) or runner(feeds)
    cond = fast.conditioning("a cat", 16, 16, with_negative=True)
    x = torch.randn(1, 4, 8, 8)
    for guidance in (1.0, 4.0):
        expected = UNetDenoiser(model.reverse_unet)(x, 500, cond, guidance)
        actual = fast.reverse_denoiser(x, 500, cond, guidance)
        assert (actual - expected).abs().max() <= 1e-4 * (1 + expected.abs().max())
    assert batches == [1, 2]
    args = (scene(), "a red square", "a green square")
    options = {"guidance": 4.0, "tau": 0.8, "settings": SamplerSettings(seed=0)}
    assert pixel_gap(edit(fast, *args, **options), edit(model, *args, **options)) <= PIXEL_LEVELS


@onnx_needed
@pytest.mark.slow
def test_export_on_first_use_only(merged_model, caplog, monkeypatch, tmp_path):
    import icdcli.backends.accelerated as accelerated
    from icdcli import export as export_package
    from icdcli.models.runtime import ICDModel

    calls = []

    original = export_package.export_model

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(export_package, "export_model", counting)
    m = merged_model  # without its teacher: a smaller export
    model = ICDModel(
        m.info, m.vae, m.text_encoders, m.tokenizers, m.forward_unet, m.reverse_unet, teacher_unet=None, source=m.source
    )
    with caplog.at_level(logging.INFO, logger="icd"):
        folder, _ = accelerated.ensure_exported(model)
        again, _ = accelerated.ensure_exported(model)
    assert len(calls) == 1 and folder == again
    assert "to ONNX (first use)" in caplog.text
    assert folder.parent.name == "onnx" and folder.name.endswith("-fp32")
    from icdcli.cli.export import describe_cache

    listed = describe_cache()["onnx"]
    assert [entry["path"] for entry in listed] == [str(folder)] and listed[0]["complete"]


# --- denoiser seam with fake runners ----------------------------------------------------------------------


def fake_spec(guidance: str, inputs: tuple[str, ...] = ("sample", "timestep", "encoder_hidden_states")) -> GraphSpec:
    specs = [TensorSpec(name, "float32", ["batch"]) for name in inputs]
    if guidance == "embedding":
        specs.append(TensorSpec("timestep_cond", "float32", ["batch", 512]))
    return GraphSpec("reverse_unet", "reverse_unet.onnx", specs, [TensorSpec("eps", "float32", ["batch"])], guidance)


class FakeTorch:
    """A torch fallback answering `eps_of(x)` to plain and controlled steps; records the controls and installs."""

    def __init__(self, eps_of):
        self.eps_of, self.controls, self.installed = eps_of, [], 0

    def __call__(self, x, t, cond, guidance=1.0):
        return self.eps_of(x)

    def install_control(self):
        self.installed += 1

    def controlled(self, x, t, cond, guidance, control):
        self.controls.append(control)
        return ControlledEps(self.eps_of(x))


def _control(length: int = 3, blend_queries: int | None = 4):
    from icdcli.diffusion.p2p.control import StepControl

    ones = torch.ones(length)
    return StepControl(ones, ones, torch.eye(length), ones, torch.ones(1), blend_queries=blend_queries)


def test_attention_control_goes_to_the_torch_fallback():
    fallback = FakeTorch(lambda x: x * 0)
    denoiser = GraphDenoiser(lambda feeds: {"eps": feeds["sample"]}, fake_spec("embedding"), fallback=fallback)
    cond = Conditioning(PromptEmbedding(torch.zeros(1, 3, 2)))
    x = torch.ones(1, 4, 2, 2)
    assert torch.equal(denoiser(x, 999, cond, 8.0), x)
    denoiser.install_control()  # the caller's step: the fallback gets its processors
    control = _control()
    step = denoiser.controlled(x, 999, cond, 8.0, control)
    assert torch.equal(step.eps, x * 0) and fallback.controls == [control] and fallback.installed == 1
    alone = GraphDenoiser(denoiser.runner, fake_spec("embedding"))
    alone.install_control()  # nothing to install: no torch UNet
    with pytest.raises(ICDError, match="torch"):
        alone.controlled(x, 999, cond, 8.0, control)


def test_a_p2p_graph_without_the_pair_axis_hands_its_steps_to_pytorch():
    def p2p_spec(pair_axis: list) -> GraphSpec:
        control = [TensorSpec(name, "float32", [*pair_axis, 3, 3] if name == "mapper" else [*pair_axis, 3])
                   for name in P2P_CONTROL_INPUTS]  # fmt: skip
        spec = fake_spec("embedding")
        spec.inputs[0] = TensorSpec("sample", "float32", ["p2p_batch", 4, 2, 2])
        return GraphSpec("reverse_unet_p2p", "p2p.onnx", spec.inputs + control, spec.outputs, "embedding")

    def run(feeds):
        seen.append(tuple(feeds["mapper"].shape))
        return {"eps": feeds["sample"] * 2, "blend_maps": torch.zeros(feeds["mapper"].shape[0], 2, 4, 3)}

    seen: list = []
    fallback = FakeTorch(lambda x: x * 0)
    cond = Conditioning(PromptEmbedding(torch.zeros(2, 3, 2)))
    x = torch.ones(2, 4, 2, 2)
    control = _control()
    older = GraphDenoiser(run, fake_spec("embedding"), fallback=fallback, p2p=(run, p2p_spec([])))
    assert torch.equal(older.controlled(x, 519, cond, 8.0, control).eps, x * 0) and seen == []  # format 2: PyTorch
    current = GraphDenoiser(run, fake_spec("embedding"), fallback=fallback, p2p=(run, p2p_spec(["p2p_pairs"])))
    step = current.controlled(x, 519, cond, 8.0, control)
    assert torch.equal(step.eps, x * 2) and seen == [(1, 3, 3)]  # one pair: axis of 1
    assert [tuple(m.shape) for m in step.maps] == [(2, 4, 3)]
    without_blend = current.controlled(x, 519, cond, 8.0, _control(blend_queries=None))
    assert without_blend.maps == ()  # no local blend: no maps returned


def test_uncovered_shapes_fall_back_and_folded_graph_refuses_guidance():
    def uncovered(feeds):
        raise ShapeNotCovered("outside every profile")

    fallback = FakeTorch(lambda x: x + 1)
    cond = Conditioning(PromptEmbedding(torch.zeros(1, 3, 2)))
    x = torch.zeros(1, 4, 2, 2)
    assert torch.equal(GraphDenoiser(uncovered, fake_spec("folded"), fallback=fallback)(x, 19, cond), x + 1)
    folded = GraphDenoiser(lambda feeds: {"eps": feeds["sample"]}, fake_spec("folded"))
    assert torch.equal(folded(x, 19, cond, 1.0), x)
    with pytest.raises(ValueError, match="folded"):
        folded(x, 19, cond, 3.0)


def test_embedding_graph_gets_the_guidance_embedding():
    from icdcli.diffusion.denoiser import guidance_scale_embedding

    captured = {}
    denoiser = GraphDenoiser(lambda feeds: captured.update(feeds) or {"eps": feeds["sample"]}, fake_spec("embedding"))
    denoiser(torch.zeros(1, 4, 2, 2), 259, Conditioning(PromptEmbedding(torch.zeros(1, 3, 2))), 19.0)
    assert torch.equal(captured["timestep_cond"], guidance_scale_embedding(torch.tensor([19.0])))
    assert captured["timestep"].tolist() == [259.0] and captured["timestep"].dtype == torch.float32


# --- backend selection ------------------------------------------------------------------------------------


def facts(**overrides) -> BackendFacts:
    values = dict(cuda=False, tensorrt=False, onnxruntime=True, onnxruntime_cuda=False, onnx=True)
    return BackendFacts(**{**values, **overrides})


def test_auto_picks_the_fastest_backend_present():
    assert choose_backend("auto", facts()) == "onnxruntime"
    assert choose_backend("auto", facts(onnxruntime=False)) == "torch"
    assert choose_backend("auto", facts(cuda=True, tensorrt=True)) == "tensorrt"
    assert choose_backend("auto", facts(cuda=True)) == "torch"  # a CPU session would be slower than the GPU
    assert choose_backend("auto", facts(cuda=True, onnxruntime_cuda=True)) == "onnxruntime"
    assert choose_backend("auto", facts(tensorrt=True)) == "onnxruntime"  # TensorRT without CUDA cannot run


def test_named_backends_that_cannot_run_say_what_to_do():
    assert choose_backend("torch", facts(onnxruntime=False)) == "torch"
    with pytest.raises(ICDError, match="pip install 'icd\\[onnx\\]'"):
        choose_backend("onnxruntime", facts(onnxruntime=False))
    with pytest.raises(ICDError, match="NVIDIA GPU"):
        choose_backend("tensorrt", facts(tensorrt=True))
    with pytest.raises(ICDError, match="pip install 'icd\\[tensorrt\\]'"):
        choose_backend("tensorrt", facts(cuda=True))
    with pytest.raises(ICDError, match="unknown backend"):
        choose_backend("directml", facts())


def test_select_backend_here():
    assert select_backend("torch", device="cpu") == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(ICDError):
            select_backend("tensorrt", device="cpu")


# --- TensorRT: pure logic ---------------------------------------------------------------------------------


def tiny_manifest(guidance_distilled: bool = True) -> Manifest:
    from tiny import _text_encoder, make_teacher

    from icdcli.export.signatures import text_specs, unet_specs, vae_specs
    from icdcli.training.tokenizer import build_word_tokenizer

    unet = make_teacher("sd15", guidance_distilled=guidance_distilled)
    graphs = {}
    for role in ("forward_unet", "reverse_unet"):
        inputs, outputs, guidance = unet_specs(unet, role, latent_channels=4, text_length=12, dtype=torch.float32)
        graphs[role] = GraphSpec(role, f"{role}.onnx", inputs, outputs, guidance, sha256=f"{role}-hash")
    for name, (inputs, outputs) in vae_specs(4).items():
        graphs[name] = GraphSpec(name, f"{name}.onnx", inputs, outputs, sha256=f"{name}-hash")
    encoder = _text_encoder(build_word_tokenizer(["a"], 12), False, 0)
    inputs, outputs = text_specs(encoder, 12, pooled=False, dtype=torch.float32)
    graphs["text_encoder"] = GraphSpec("text_encoder", "text_encoder.onnx", inputs, outputs, sha256="t")
    info = {"native_size": 512, "size_multiple": 64}
    return Manifest("tiny-0123-fp16", "0123", "fp16", 17, info, 8, 4, 12, graphs)


def test_build_mode_follows_the_tensorrt_version():
    strongly, flag = trt_plan.BuildMode(True, False), trt_plan.BuildMode(False, True)
    assert trt_plan.build_mode("10.12.0.36", "fp16") == strongly
    assert trt_plan.build_mode("11.4.0.106", "fp16") == strongly  # TensorRT 11 has no BuilderFlag.FP16
    assert trt_plan.build_mode("11.4.0", "fp32") == strongly
    assert trt_plan.build_mode("10.11.0", "fp16") == flag
    assert trt_plan.build_mode("10.0.1.6", "fp16") == flag
    assert trt_plan.build_mode("10.11.0", "fp32") == trt_plan.BuildMode(False, False)


def request_of(requests, graph):
    return next(r for r in requests if r.graph == graph)


def test_one_engine_per_graph_with_native_batched_landscape_and_portrait_profiles():
    requests = trt_plan.plan_engines(tiny_manifest())
    assert sorted(r.graph for r in requests) == sorted(tiny_manifest().graphs)
    reverse = request_of(requests, "reverse_unet")
    assert [label for label, _ in reverse.profiles] == ["native", "batched", "landscape", "portrait"]
    assert reverse.labelled("native")["sample"] == ((1, 4, 64, 64),) * 3
    assert reverse.labelled("native")["timestep_cond"] == ((1, 512),) * 3
    assert reverse.labelled("batched")["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64))
    low, opt, high = reverse.labelled("landscape")["sample"]
    assert low[2] <= 32 and high[2] == 64 and low[3] == 64 and high[3] >= 128  # width up to 2x native at 4:1
    assert (low[0], opt[0], high[0]) == (1, 1, trt_plan.DEFAULT_BATCH)  # tuned for one image, holds two
    assert reverse.labelled("portrait")["sample"] == tuple(s[:2] + (s[3], s[2]) for s in (low, opt, high))
    decoder = request_of(requests, "vae_decoder")
    assert [label for label, _ in decoder.profiles] == ["landscape", "portrait"]
    assert decoder.labelled("landscape")["latents"][2][0] == 2
    text = request_of(requests, "text_encoder")  # a source and a target prompt per image
    assert text.profiles == (("only", {"input_ids": ((1, 12), (1, 12), (4, 12))}),)


@pytest.mark.parametrize("native, multiple", [(512, 64), (1024, 64), (32, 16), (512, 8)])
def test_profiles_cover_every_size_the_image_fitting_gives(native, multiple):
    """Every working size of a photo up to 4:1 either way lies in a profile of the VAE and of the UNets (item 1)."""
    from icdcli.io.images import fit_size

    manifest = tiny_manifest()
    manifest.info.update(native_size=native, size_multiple=multiple)
    requests = trt_plan.plan_engines(manifest)
    graphs = {g: request_of(requests, g).profiles for g in ("vae_encoder", "vae_decoder", "reverse_unet")}
    factor = manifest.vae_scale_factor
    for step in range(0, 3001, 7):  # aspect 1 .. 4
        for width, height in ((1000 + step, 1000), (1000, 1000 + step)):
            w, h = fit_size(width, height, native_size=native, multiple=multiple)
            shapes = {
                "vae_encoder": {"images": (1, 3, h, w)},
                "vae_decoder": {"latents": (1, 4, h // factor, w // factor)},
                "reverse_unet": {
                    "sample": (1, 4, h // factor, w // factor), "timestep": (1,),
                    "encoder_hidden_states": (1, 12, 32), "timestep_cond": (1, 512),
                },
            }  # fmt: skip
            for graph, profiles in graphs.items():
                assert trt_plan.choose_profile(profiles, shapes[graph]) is not None, (graph, w, h)
    # the 2.5:1 photo that fell outside the old profile of 3/2 native
    w, h = fit_size(2500, 1000, native_size=native, multiple=multiple)
    assert w >= native * 3 // 2
    assert trt_plan.choose_profile(graphs["vae_encoder"], {"images": (1, 3, h, w)}) is not None


def test_photos_thinner_than_the_profiles_are_not_covered():
    from icdcli.io.images import fit_size

    profiles = request_of(trt_plan.plan_engines(tiny_manifest()), "vae_encoder").profiles
    w, h = fit_size(8000, 1000, native_size=512, multiple=64)
    assert trt_plan.choose_profile(profiles, {"images": (1, 3, h, w)}) is None


def test_cfg_models_get_batch_two_profiles_and_requested_sizes():
    requests = trt_plan.plan_engines(tiny_manifest(False), height=768, width=384)
    reverse = request_of(requests, "reverse_unet")
    assert reverse.labelled("native")["sample"] == ((1, 4, 96, 48),) * 3
    low, opt, high = reverse.labelled("portrait")["sample"]
    # two images, each a [negative, prompt] pair on guided steps; tuned for one image's pair
    assert (low[0], opt[0], high[0]) == (1, 2, 4) and opt[2:] == (96, 48) and high[2] >= 96
    landscape = reverse.labelled("landscape")["sample"]
    assert landscape[1][0] == 2 and landscape[2][0] == 4
    assert reverse.labelled("batched")["sample"] == ((1, 4, 96, 48), (4, 4, 96, 48), (4, 4, 96, 48))
    forward = request_of(requests, "forward_unet")
    assert forward.labelled("landscape")["sample"][1][0] == 1  # the forward model is never run with CFG
    assert forward.labelled("landscape")["sample"][2][0] == 2


def test_requested_sizes_beyond_the_fitted_ones_widen_their_profile():
    reverse = request_of(trt_plan.plan_engines(tiny_manifest(), height=512, width=1600), "reverse_unet")
    low, opt, high = reverse.labelled("landscape")["sample"]
    assert opt[2:] == (64, 200) and high[3] >= 200
    assert reverse.labelled("native")["sample"] == ((1, 4, 64, 200),) * 3


def test_profile_choice_prefers_the_static_profile():
    reverse = request_of(trt_plan.plan_engines(tiny_manifest(False)), "reverse_unet")
    shapes = {"sample": (1, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (1, 12, 32)}
    assert reverse.profiles[trt_plan.choose_profile(reverse.profiles, shapes)][0] == "native"
    batch_two = {name: (2, *shape[1:]) for name, shape in shapes.items()}
    assert reverse.profiles[trt_plan.choose_profile(reverse.profiles, batch_two)][0] == "batched"
    wide_two = {**batch_two, "sample": (2, 4, 48, 96)}
    assert reverse.profiles[trt_plan.choose_profile(reverse.profiles, wide_two)][0] == "landscape"
    tall = {**shapes, "sample": (1, 4, 96, 48)}
    assert reverse.profiles[trt_plan.choose_profile(reverse.profiles, tall)][0] == "portrait"
    thin = {**shapes, "sample": (1, 4, 8, 512)}
    assert trt_plan.choose_profile(reverse.profiles, thin) is None


@pytest.mark.parametrize("native, latent", [(512, 64), (1024, 128)])  # SD1.5 at 512 px, SDXL at 1024 px
def test_engines_for_64_and_128_latents_hold_batch_one_and_two(native, latent):
    manifest = tiny_manifest()
    manifest.info.update(native_size=native, size_multiple=64)
    requests = trt_plan.plan_engines(manifest)
    reverse = request_of(requests, "reverse_unet").profiles
    decoder = request_of(requests, "vae_decoder").profiles
    for batch in (1, 2):
        unet = {
            "sample": (batch, 4, latent, latent), "timestep": (batch,), "encoder_hidden_states": (batch, 12, 32),
            "timestep_cond": (batch, 512),
        }  # fmt: skip
        chosen = trt_plan.choose_profile(reverse, unet)
        assert reverse[chosen][0] == ("native" if batch == 1 else "batched")
        assert trt_plan.choose_profile(decoder, {"latents": (batch, 4, latent, latent)}) is not None
        assert trt_plan.choose_profile(reverse, {**unet, "sample": (batch, 4, latent // 2, latent * 2)})
    three = {"sample": (3, 4, latent, latent), "timestep": (3,), "encoder_hidden_states": (3, 12, 32)}
    assert trt_plan.choose_profile(reverse, {**three, "timestep_cond": (3, 512)}) is None  # beyond batch 2


def test_memory_budget_arithmetic():
    budget = trt_plan.MemoryBudget(device_bytes=1000, weight_bytes=100, bytes_per_position=10)
    assert budget.largest_batch(10) == 4  # 0.8 * 1000 - 100 = 700 bytes: 7 images of 100, down to a power of two
    assert budget.largest_batch(5) == 8  # 14 images of 50
    assert budget.largest_batch(1) == trt_plan.MAX_BATCH  # 70 images, capped
    assert budget.largest_batch(71) == 1 and budget.largest_batch(10**6) == 1  # never below one image
    assert trt_plan.MemoryBudget(1000, 900, 10).largest_batch(1) == 1  # weights alone beyond the headroom
    assert [trt_plan.power_of_two_floor(n) for n in (1, 2, 3, 7, 8, 15, 16)] == [1, 2, 2, 4, 8, 8, 16]
    gib = 2**30
    sdxl_on_24gb = trt_plan.MemoryBudget(24 * gib, 7 * 10**9, trt_plan.RULE_BYTES_PER_POSITION["fp16"])
    assert sdxl_on_24gb.largest_batch(128 * 128) == 8  # (19.2 GiB - 6.5 GiB) / 1 GiB per image = 12 -> 8
    sd15_on_h200 = trt_plan.MemoryBudget(141 * gib, int(3.5e9), trt_plan.RULE_BYTES_PER_POSITION["fp16"])
    assert sd15_on_h200.largest_batch(64 * 64) == trt_plan.MAX_BATCH


def test_profiles_from_a_memory_budget_follow_each_profiles_size():
    manifest = tiny_manifest()
    native = 64 * 64  # latent positions at 512 px; landscape and portrait reach twice that
    budget = trt_plan.MemoryBudget(device_bytes=10_000 * native, weight_bytes=0, bytes_per_position=1000)
    requests = trt_plan.plan_engines(manifest, budget=budget)  # room for 8 native images, 4 at the widest
    reverse = request_of(requests, "reverse_unet")
    assert reverse.labelled("native")["sample"][2][0] == 1
    assert reverse.labelled("batched")["sample"][2][0] == 8
    assert reverse.labelled("landscape")["sample"][2][0] == 4 and reverse.labelled("portrait")["sample"][2][0] == 4
    pinned = request_of(trt_plan.plan_engines(manifest, max_batch=3, budget=budget), "reverse_unet")
    assert {pinned.labelled(label)["sample"][2][0] for label in ("batched", "landscape", "portrait")} == {3}
    single = request_of(trt_plan.plan_engines(manifest, max_batch=1), "reverse_unet")
    assert [label for label, _ in single.profiles] == ["native", "landscape", "portrait"]  # no batched profile


def test_device_budget_reads_the_gpu_and_the_export(tmp_path, monkeypatch):
    import types

    manifest = tiny_manifest()
    for spec in manifest.graphs.values():
        (tmp_path / spec.file).write_bytes(b"w" * 1000)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=5e9))
    budget = trt_engine.device_budget(torch.device("cuda", 0), tmp_path, manifest)
    assert budget.device_bytes == 5 * 10**9 and budget.weight_bytes == 1000 * len(manifest.graphs)
    assert budget.bytes_per_position == trt_plan.RULE_BYTES_PER_POSITION["fp16"]  # the tiny manifest is fp16
    auto = trt_engine.resolve_sizes(tmp_path, height=None, width=None, max_batch=trt_plan.AUTO_BATCH)
    assert auto == trt_plan.EngineSizes(batch=trt_plan.AUTO_BATCH) and auto.fixed_batch is None
    assert trt_plan.EngineSizes.from_json(auto.to_json()) == auto  # recorded by `icd export --batch auto`


GPU = trt_plan.DeviceFacts("NVIDIA H100 80GB HBM3", "9.0")


def test_engine_cache_key_changes_with_every_input():
    profiles = trt_plan.plan_engines(tiny_manifest())[0].profiles
    mode = trt_plan.BuildMode(True, False)
    base = trt_plan.engine_cache_key("onnx-a", profiles, mode=mode, trt_version="10.12.0", device=GPU)
    assert base == trt_plan.engine_cache_key("onnx-a", profiles, mode=mode, trt_version="10.12.0", device=GPU)
    other_profiles = ((profiles[0][0], {**profiles[0][1], "sample": ((1, 4, 8, 8),) * 3}), *profiles[1:])
    variants = [
        trt_plan.engine_cache_key("onnx-b", profiles, mode=mode, trt_version="10.12.0", device=GPU),
        trt_plan.engine_cache_key("onnx-a", other_profiles, mode=mode, trt_version="10.12.0", device=GPU),
        trt_plan.engine_cache_key(
            "onnx-a", profiles, mode=trt_plan.BuildMode(False, True), trt_version="10.12.0", device=GPU
        ),
        trt_plan.engine_cache_key("onnx-a", profiles, mode=mode, trt_version="10.13.0", device=GPU),
        trt_plan.engine_cache_key(
            "onnx-a", profiles, mode=mode, trt_version="10.12.0", device=trt_plan.DeviceFacts(GPU.name, "8.9")
        ),
        trt_plan.engine_cache_key(
            "onnx-a", profiles, mode=mode, trt_version="10.12.0", device=trt_plan.DeviceFacts("NVIDIA H200", "9.0")
        ),
    ]
    assert len({base, *variants}) == 7


def test_cache_keys_and_timing_cache_carry_the_build_format(monkeypatch, tmp_path):
    profiles = trt_plan.plan_engines(tiny_manifest())[0].profiles
    mode = trt_plan.BuildMode(True, False)
    before = trt_plan.engine_cache_key("onnx", profiles, mode=mode, trt_version="10.12.0", device=GPU)
    timing = trt_plan.timing_cache_file(tmp_path, "10.12.0", GPU)
    assert "nvidia-h100-80gb-hbm3" in timing.name and "sm90" in timing.name and "10.12.0" in timing.name
    other_gpu = trt_plan.timing_cache_file(tmp_path, "10.12.0", trt_plan.DeviceFacts("NVIDIA L4", "8.9"))
    assert other_gpu != timing
    monkeypatch.setattr(trt_plan, "BUILD_FORMAT", trt_plan.BUILD_FORMAT + 1)
    assert trt_plan.engine_cache_key("onnx", profiles, mode=mode, trt_version="10.12.0", device=GPU) != before
    assert trt_plan.timing_cache_file(tmp_path, "10.12.0", GPU) != timing


def test_saved_export_sizes_give_the_same_engines_at_run_time(tmp_path):
    """`icd export --height/--width/--batch` records its sizes; a later run without sizes plans the same engines."""
    from icdcli.export.manifest import read_engine_sizes, write_engine_sizes

    manifest = tiny_manifest()
    mode = trt_plan.BuildMode(True, False)

    def keys(sizes):
        requests = trt_plan.plan_engines(manifest, height=sizes.height, width=sizes.width, max_batch=sizes.batch)
        return {
            r.graph: trt_plan.engine_cache_key("x", r.profiles, mode=mode, trt_version="10.12", device=GPU)
            for r in requests
        }

    exported = trt_plan.EngineSizes(768, 384, 2)
    write_engine_sizes(tmp_path, exported.to_json())
    assert read_engine_sizes(tmp_path) == {"height": 768, "width": 384, "batch": 2}
    at_run_time = trt_engine.resolve_sizes(tmp_path, height=None, width=None, max_batch=None)
    assert at_run_time == exported and keys(at_run_time) == keys(exported)
    assert keys(trt_engine.resolve_sizes(tmp_path.parent, height=None, width=None, max_batch=None)) != keys(
        exported
    )  # nothing recorded
    assert trt_engine.resolve_sizes(tmp_path, height=512, width=None, max_batch=None) == trt_plan.EngineSizes(
        512, None, None
    )
    (tmp_path / "engine_sizes.json").write_text("not json")
    assert read_engine_sizes(tmp_path) is None


def test_stale_and_foreign_engines_are_not_loaded(tmp_path):
    import json

    request = trt_plan.plan_engines(tiny_manifest())[0]
    plan = trt_plan.engine_file(tmp_path, request, "f" * 64)
    assert plan.name.startswith(f"{request.graph}-ffff")
    assert trt_plan.stale_reason(trt_plan.read_meta(plan), "f" * 64) == "not built yet"
    plan.write_bytes(b"engine")
    plan.with_suffix(".json").write_text(json.dumps({"key": "e" * 64}))
    assert "other" in trt_plan.stale_reason(trt_plan.read_meta(plan), "f" * 64)
    plan.with_suffix(".json").write_text(json.dumps({"key": "f" * 64}))
    assert trt_plan.stale_reason(trt_plan.read_meta(plan), "f" * 64) is None
    plan.unlink()  # metadata without its engine (an interrupted copy) counts as not built
    assert trt_plan.stale_reason(trt_plan.read_meta(plan), "f" * 64) == "not built yet"


def test_fitted_sides_and_version_parsing():
    assert trt_plan.fitted_sides(512, 64, max_aspect=1.0) == (512, 512)
    short, long = trt_plan.fitted_sides(512, 64)
    assert short == 256 and long == 1024
    assert trt_plan.parse_version("10.12.0.36") == (10, 12, 0)
    assert trt_plan.parse_version("10.0.1b") == (10, 0, 1)


@pytest.mark.slow
def test_tensorrt_backend_without_library_or_gpu_is_a_clear_error(merged_model):
    with pytest.raises(ICDError):
        accelerate(merged_model, "tensorrt")


# --- TensorRT: real builds (only where the library and a GPU exist) ---------------------------------------


real_tensorrt = pytest.mark.skipif(
    not (trt_lib.is_importable() and torch.cuda.is_available()),
    reason="needs TensorRT (pip install 'icd[tensorrt]') and a CUDA GPU; neither is required elsewhere",
)


@real_tensorrt
def test_tensorrt_edit_matches_torch(merged_dir, tmp_path_factory):
    from icdcli.models.runtime import load_merged

    model = load_merged(merged_dir, need_teacher=False).to("cuda", torch.float16)
    fast = accelerate(model, "tensorrt")
    args = (scene(), "a red square", "a green square")
    options = {"guidance": 7.0, "tau": 0.8, "settings": SamplerSettings(seed=0)}
    # fp16 engines against fp16 torch: kernels differ, so allow what fp16 rounding moves through 8 steps
    assert pixel_gap(edit(fast, *args, **options), edit(model, *args, **options)) <= 8
    wide = scene().resize((84, 32))  # 2.6:1: the landscape profiles
    assert pixel_gap(edit(fast, wide, *args[1:], **options), edit(model, wide, *args[1:], **options)) <= 8
    assert fast.reverse_denoiser.runner.engine is not None and not fast.told  # nothing fell back to PyTorch


@real_tensorrt
def test_tensorrt_export_check(merged_dir, tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.export import export

    out = tmp_path / "trt"
    arguments = ["--model", str(merged_dir), "--out", str(out), "--backend", "tensorrt", "--device", "cuda", "--check"]
    result = CliRunner().invoke(export, arguments)
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output and "TensorRT engines" in result.output


# --- icd export -------------------------------------------------------------------------------------------


def test_export_command_help_and_tensorrt_error():
    from click.testing import CliRunner

    from icdcli.cli.export import export

    runner = CliRunner()
    result = runner.invoke(export, ["--help"])
    assert result.exit_code == 0 and "--backend" in result.output and "timestep_cond" in result.output
    if not (trt_lib.is_importable() and torch.cuda.is_available()):
        result = runner.invoke(export, ["--backend", "tensorrt"])
        assert result.exit_code != 0 and "tensorrt" in result.output.lower()


@onnx_needed
@pytest.mark.slow
def test_export_command_writes_an_export_folder(merged_dir, tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.export import export
    from icdcli.export import read_manifest

    out = tmp_path / "onnx-out"
    cpu = ["--device", "cpu"]  # the CPU path, also on a machine with a GPU
    result = CliRunner().invoke(export, ["--model", str(merged_dir), "--out", str(out), *cpu])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest is not None and "teacher_unet" in manifest.graphs
    assert "reverse_unet_p2p" in manifest.graphs  # an SD1.5-family model: P2P by default
    assert "ONNX export" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["onnx-out"]  # no staging folder left behind
    again = CliRunner().invoke(export, ["--model", str(merged_dir), "--out", str(out), *cpu])
    assert again.exit_code == 0 and "is up to date" in again.output and "exporting" not in again.output
    lean = tmp_path / "no-p2p"
    result = CliRunner().invoke(export, ["--model", str(merged_dir), "--out", str(lean), "--no-p2p", *cpu])
    assert result.exit_code == 0, result.output
    graphs = read_manifest(lean).graphs
    assert "reverse_unet_p2p" not in graphs and "reverse_unet" in graphs


# --- onnxruntime CUDA binding with a fake session ---------------------------------------------------------


class FakeOrtBinding:
    """Records what OrtGraph binds; `run` writes 2 * sample into eps through the bound addresses."""

    def __init__(self, events: list):
        self.events, self.bound = events, {}

    def bind_input(self, name, device, index, dtype, shape, address):
        self.events.append(("bind_input", name, device, index, tuple(shape)))
        self.bound[name] = (address, tuple(shape), dtype)

    def bind_output(self, name, device, index, dtype, shape, address):
        self.events.append(("bind_output", name, device, index, tuple(shape)))
        self.bound[name] = (address, tuple(shape), dtype)

    def synchronize_inputs(self):
        self.events.append("synchronize_inputs")

    def synchronize_outputs(self):
        self.events.append("synchronize_outputs")

    def array(self, name):
        import ctypes

        address, shape, dtype = self.bound[name]
        count = int(np.prod(shape))
        raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


def test_onnxruntime_cuda_binding_waits_for_torch_before_running():
    from icdcli.engines.onnxruntime import OrtGraph, cuda_provider_options

    assert cuda_provider_options(1, 0) == {"device_id": "1"}  # torch's default stream: ORT would drop it
    assert cuda_provider_options(0, 1234) == {
        "device_id": "0", "has_user_compute_stream": "1", "user_compute_stream": "1234",
    }  # fmt: skip
    events: list = []
    binding = FakeOrtBinding(events)

    class Session:
        def io_binding(self):
            return binding

        def run_with_iobinding(self, bound):
            events.append("run")
            bound.array("eps")[...] = 2 * bound.array("sample")

    spec = GraphSpec(
        "forward_unet", "forward_unet.onnx", [TensorSpec("sample", "float32", ["batch", 4, "latent_height", 8])],
        [TensorSpec("eps", "float32", ["batch", 4, "latent_height", 8])], "folded",
    )  # fmt: skip
    graph = OrtGraph.__new__(OrtGraph)
    graph.spec, graph.device, graph.vae_scale_factor, graph.session = spec, torch.device("cpu"), 8, Session()
    graph.binding, graph.index, graph.output_names = True, 1, ["eps"]
    graph.numpy_dtypes = {"float32": np.float32}
    graph.synchronize = lambda: events.append("torch stream synchronized")
    x = torch.randn(2, 4, 6, 8)
    eps = graph({"sample": x})["eps"]
    assert torch.allclose(eps, 2 * x, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
    order = [e if isinstance(e, str) else e[0] for e in events]
    assert order == [
        "bind_input", "bind_output", "torch stream synchronized", "synchronize_inputs", "run", "synchronize_outputs",
    ]  # fmt: skip
    assert events[0] == ("bind_input", "sample", "cuda", 1, (2, 4, 6, 8))
    assert events[1] == ("bind_output", "eps", "cuda", 1, (2, 4, 6, 8))


# --- PyTorch UNets leave the GPU once their graph runs ----------------------------------------------------


class MovingModule:
    def __init__(self):
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_torch_unet_leaves_the_gpu_once_its_graph_runs_and_returns_for_good_when_needed():
    from icdcli.backends.accelerated import OffloadingFallback

    unet, torch_denoiser = MovingModule(), FakeTorch(lambda x: x * 0 - 1)
    fallback = OffloadingFallback(torch_denoiser, unet, torch.device("cuda", 1), "reverse")
    denoiser = GraphDenoiser(lambda feeds: {"eps": feeds["sample"]}, fake_spec("embedding"), fallback=fallback)
    cond = Conditioning(PromptEmbedding(torch.zeros(1, 3, 2)))
    x = torch.ones(1, 4, 2, 2)
    denoiser(x, 999, cond, 8.0)
    denoiser(x, 779, cond, 8.0)
    assert unet.moves == ["cpu"] and fallback.released
    denoiser.install_control()
    assert torch_denoiser.installed == 1 and unet.moves == ["cpu"]  # processors hold no weights: nothing moves
    step = denoiser.controlled(x, 519, cond, 8.0, _control())  # attention control needs the torch UNet
    assert torch.equal(step.eps, x * 0 - 1) and len(torch_denoiser.controls) == 1
    assert unet.moves == ["cpu", "cuda:1"] and not fallback.released
    denoiser(x, 259, cond, 8.0)
    assert unet.moves == ["cpu", "cuda:1"]  # needed once: it stays
    assert fallback.__call__ is not None and not hasattr(fallback, "no_such_attribute")
    cpu_model = OffloadingFallback(FakeTorch(lambda x: x), MovingModule(), torch.device("cpu"), "forward")
    cpu_model.release()
    assert cpu_model.unet.moves == [] and not cpu_model.released


@onnx_needed
@pytest.mark.slow
def test_export_command_for_tensorrt_saves_its_sizes_and_builds_every_graph(merged_dir, tmp_path, monkeypatch):
    """The CLI wiring of `icd export --backend tensorrt` (TensorRT itself stubbed: the fake-module tests cover it)."""
    from click.testing import CliRunner

    import icdcli.backends.accelerated as accelerated
    from icdcli.cli.export import export
    from icdcli.export.manifest import read_engine_sizes

    monkeypatch.setattr(accelerated, "probe_backends", lambda device=None: facts(cuda=True, tensorrt=True))
    calls = []
    monkeypatch.setattr(trt_engine, "load_parts", lambda *args, **kwargs: calls.append(kwargs))
    out = tmp_path / "trt"
    base = ["--model", str(merged_dir), "--out", str(out), "--backend", "tensorrt", "--device", "cpu"]
    result = CliRunner().invoke(export, [*base, "--precision", "fp32", "--height", "48", "--width", "80"])
    assert result.exit_code == 0, result.output
    assert read_engine_sizes(out) == {"height": 48, "width": 80}
    assert calls[0]["height"] == 48 and sorted(calls[0]["build_now"]) == sorted(read_manifest_of(out).graphs)
    result = CliRunner().invoke(export, [*base, "--precision", "fp32", "--height", "50"])
    assert result.exit_code != 0 and "--height 50 is not a multiple of" in result.output


def read_manifest_of(folder):
    from icdcli.export import read_manifest

    return read_manifest(folder)


def test_export_batch_option_takes_a_count_or_auto():
    import click

    from icdcli.cli.export import BatchType

    assert BatchType().convert("4", None, None) == 4 and BatchType().convert("AUTO", None, None) == "auto"
    for bad in ("0", "two", "1.5"):
        with pytest.raises(click.BadParameter):
            BatchType().convert(bad, None, None)
