"""Prompt-to-Prompt inside the exported reverse graph: ONNX Runtime against PyTorch on the default model.

Tolerance: 1e-4 on latents and pixels in [-1, 1]. Each graph agrees with PyTorch to ~1e-6 (float32 sums in
another order); four guided steps of two branches, local blend and the VAE decoder keep the gap near 3e-6.
A wrong control (a branch swapped, a flag ignored, maps from the wrong layers) moves values by 0.1 or more.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from close import assert_close_to_scale
from PIL import Image

from icdcli.diffusion.p2p.plan import P2PBatch, make_plan
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.diffusion.sampler import p2p_decode, p2p_pairs
from icdcli.diffusion.schedule import NoiseSchedule
from icdcli.editing.edits import decode_p2p
from icdcli.editing.inversion import invert
from icdcli.editing.stages import conditioning_at as _conditioning
from icdcli.export.manifest import P2P_CONTROL_INPUTS, REVERSE_P2P, GraphSpec
from icdcli.models.sources import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="needs onnxruntime and onnx (pip install 'icd[onnx]')",
)
pytestmark = [pytestmark, pytest.mark.slow]  # every test here runs on the module's ONNX export

SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"
EXAMPLE = DEFAULT_MODEL_DIR.parent.parent / "examples" / "red-circle.png"
SETTINGS = P2PSettings(blend=("circle",), blend_threshold=0.95, amplify=(("yellow", 1.5),))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from icdcli.backends.accelerated import accelerate
    from icdcli.export.onnx import export_model
    from icdcli.models.sources import ModelRequest, load_requested_model

    model = load_requested_model(ModelRequest(None, None, None, None, None))
    folder = tmp_path_factory.mktemp("default-export") / "fp32"
    export_model(model, folder, include_teacher=False)
    return model, accelerate(model, "onnxruntime", export_dir=folder)


@pytest.fixture(scope="module")
def inversion(models):
    return invert(models[0], Image.open(EXAMPLE).convert("RGB"), SOURCE, settings=SamplerSettings())


def _decode(model, inversion, settings: P2PSettings):
    pairs = p2p_pairs(model.info.reverse_boundaries, None)
    plan = make_plan(
        model.tokenizers[0],
        SOURCE,
        TARGET,
        settings=settings,
        num_steps=len(pairs),
        latent_side=inversion.latents.shape[-1],
    )
    cond = _conditioning(model, [SOURCE, TARGET], inversion.size, 4.0)
    schedule = NoiseSchedule.stable_diffusion()
    both = p2p_decode(model.reverse_denoiser, inversion.latents, cond, pairs, 4.0, 0.8, schedule, plan)
    return both, plan


def test_the_export_holds_a_p2p_graph_with_control_inputs_and_blend_maps(models):
    spec = models[1].reverse_denoiser.p2p[1]
    assert isinstance(spec, GraphSpec) and spec.name == REVERSE_P2P
    assert set(P2P_CONTROL_INPUTS) <= set(spec.input_names) and "timestep_cond" in spec.input_names
    assert spec.input("sample").shape == ["p2p_batch", 4, 16, 16]  # static spatial size: the native latents
    assert spec.input("mapper").shape == ["p2p_pairs", 16, 16] and spec.input("self_replace").shape == ["p2p_pairs", 1]
    assert [o.name for o in spec.outputs] == ["eps", "blend_maps"]
    assert spec.outputs[1].shape == [
        "p2p_pairs",
        2,
        256,
        16,
    ]  # 16x16 blend maps; the pair axis leads, as on the control inputs


def test_p2p_on_onnxruntime_matches_pytorch_with_every_control(models, inversion):
    model, fast = models
    torch_both, torch_plan = _decode(model, inversion, SETTINGS)
    ort_both, ort_plan = _decode(fast, inversion, SETTINGS)
    assert_close_to_scale(ort_both, torch_both)
    assert_close_to_scale(ort_plan.map_sum, torch_plan.map_sum)
    options = {"size": inversion.size, "guidance": 4.0, "tau": 0.8, "settings": SamplerSettings(), "p2p": SETTINGS}
    pixels_torch = decode_p2p(model, inversion.latents, SOURCE, TARGET, **options)
    pixels_ort = decode_p2p(fast, inversion.latents, SOURCE, TARGET, **options)
    assert torch.allclose(pixels_torch, pixels_ort, atol=1e-4)
    plain, _ = _decode(fast, inversion, P2PSettings(cross_replace=0.0, self_replace=0.0))
    assert (plain - ort_both).abs().max() > 0.05  # the control inputs really act inside the graph


def test_p2p_runs_in_the_graph_without_any_pytorch_unet(models, inversion):
    model, fast = models
    denoiser = fast.reverse_denoiser
    fallback, denoiser.fallback = denoiser.fallback, None
    try:
        graph_only, _ = _decode(fast, inversion, SETTINGS)
    finally:
        denoiser.fallback = fallback
    reference, _ = _decode(model, inversion, SETTINGS)
    assert_close_to_scale(graph_only, reference)


def test_other_sizes_fall_back_to_pytorch_attention(models):
    model, fast = models
    image = Image.open(EXAMPLE).convert("RGB").resize((48, 48))
    wide = replace(model.info, native_size=48)
    original = model.info
    try:
        model.info = wide  # 24x24 latents: not the P2P graph's 16x16
        inverted = invert(fast, image, SOURCE, settings=SamplerSettings())
        assert fast.reverse_denoiser._p2p_mismatch(inverted.latents) is not None
        options = dict(size=inverted.size, guidance=4.0, tau=0.8, settings=SamplerSettings(), p2p=SETTINGS)
        ort = decode_p2p(fast, inverted.latents, SOURCE, TARGET, **options)
        ref = decode_p2p(model, inverted.latents, SOURCE, TARGET, **options)
    finally:
        model.info = original
    assert torch.allclose(ort, ref, atol=1e-4)


def _decode_pairs(model, latents, size, jobs):
    """P2P edits (target, settings, guidance, tau) of `latents` rows decoded together; (rows, plans)."""
    pairs = p2p_pairs(model.info.reverse_boundaries, None)
    tokenizer = model.tokenizers[0]
    plans = [
        make_plan(tokenizer, SOURCE, target, settings=settings, num_steps=len(pairs), latent_side=latents.shape[-1])
        for target, settings, _, _ in jobs
    ]
    cond = _conditioning(model, [prompt for target, *_ in jobs for prompt in (SOURCE, target)], size, 4.0)
    guidance = torch.tensor([job[2] for job in jobs]) if len(jobs) > 1 else jobs[0][2]
    tau = torch.tensor([job[3] for job in jobs]) if len(jobs) > 1 else jobs[0][3]
    plan = plans[0] if len(plans) == 1 else P2PBatch(plans)
    schedule = NoiseSchedule.stable_diffusion()
    return p2p_decode(model.reverse_denoiser, latents, cond, pairs, guidance, tau, schedule, plan), plans


def test_a_batch_of_pairs_runs_in_one_graph_call_per_step_and_each_pair_as_alone(models, inversion):
    model, fast = models
    jobs = [
        (TARGET, SETTINGS, 4.0, 0.8),
        ("a red circle on a red blue background", P2PSettings(cross_replace=0.3, self_replace=0.6, amplify_new=4.0),
         6.0, 0.6),
        ("a green circle on a blue background", P2PSettings(blend=("circle",), blend_threshold=0.5), 3.0, 0.8),
    ]  # fmt: skip
    noise = torch.randn((3, *inversion.latents.shape[1:]), generator=torch.Generator().manual_seed(3))
    latents = inversion.latents + 0.3 * noise  # each pair its own latents
    denoiser = fast.reverse_denoiser
    runner, spec = denoiser.p2p
    calls: list[int] = []

    def counting(feeds):
        calls.append(int(feeds["mapper"].shape[0]))
        return runner(feeds)

    denoiser.p2p = (counting, spec)
    try:
        together, batch_plans = _decode_pairs(fast, latents, inversion.size, jobs)
    finally:
        denoiser.p2p = (runner, spec)
    assert calls == [3] * 4  # four steps, each one call holding the three pairs
    for index, job in enumerate(jobs):
        alone, (plan,) = _decode_pairs(fast, latents[index : index + 1], inversion.size, [job])
        # the target rows (the edit); a pair alone may stop its source rows early (see `p2p_decode`)
        assert_close_to_scale(together[2 * index + 1], alone[1], rel=1e-5)
        if plan.blend_tokens is not None:  # local blend's maps too (collected for the whole batch, split per pair)
            assert_close_to_scale(batch_plans[index].map_sum, plan.map_sum, rel=1e-5)
    assert (together[1] - together[3]).abs().max() > 0.05  # the pairs really are different edits
    reference, _ = _decode_pairs(model, latents, inversion.size, jobs)  # PyTorch, the same batch
    assert_close_to_scale(together, reference)


def test_tensorrt_profiles_of_the_p2p_graph():
    from test_engines import tiny_manifest
    from tiny import make_teacher

    from icdcli.engines import tensorrt_plan as trt_plan
    from icdcli.export.signatures import p2p_unet_specs

    for distilled, pairs, batch in ((True, None, (2, 2, 2)), (False, None, (2, 4, 4)), (True, 4, (2, 2, 8)),
                                    (False, 4, (2, 4, 16))):  # fmt: skip
        manifest = tiny_manifest(distilled)
        unet = make_teacher("sd15", guidance_distilled=distilled)
        inputs, outputs, guidance, blend = p2p_unet_specs(
            unet, latent_channels=4, text_length=12, dtype=torch.float32, latent_side=64
        )
        manifest.graphs[REVERSE_P2P] = GraphSpec(REVERSE_P2P, "p2p.onnx", inputs, outputs, guidance, sha256="p")
        requests = [r for r in trt_plan.plan_engines(manifest, max_batch=pairs) if r.graph == REVERSE_P2P]
        assert [len(r.profiles) for r in requests] == [1] and blend == 16
        profile = requests[0].profile
        assert profile["sample"] == tuple((b, 4, 64, 64) for b in batch)
        most = pairs or 1  # one pair per call unless a batch is asked; the opt shape is always one pair
        assert profile["mapper"] == ((1, 12, 12), (1, 12, 12), (most, 12, 12))
        assert profile["self_replace"] == ((1, 1), (1, 1), (most, 1))


def test_refine_edits_agree_on_onnxruntime_and_pytorch(models, inversion):
    """Unequal word counts (refine), with a repeated word whose alignment follows the release's tie-break."""
    model, fast = models
    target = "a red circle on a red blue background"
    settings = P2PSettings(cross_replace=0.3, self_replace=0.6, amplify_new=4.0)
    results = []
    for denoiser_model in (model, fast):
        pairs = p2p_pairs(model.info.reverse_boundaries, None)
        plan = make_plan(
            model.tokenizers[0],
            SOURCE,
            target,
            settings=settings,
            num_steps=len(pairs),
            latent_side=inversion.latents.shape[-1],
        )
        assert plan.mode == "refine" and plan.refine[6] == 0  # the second "red" is the new token
        cond = _conditioning(denoiser_model, [SOURCE, target], inversion.size, 4.0)
        schedule = NoiseSchedule.stable_diffusion()
        results.append(
            p2p_decode(denoiser_model.reverse_denoiser, inversion.latents, cond, pairs, 4.0, 0.8, schedule, plan)
        )
    assert torch.allclose(results[0], results[1], atol=1e-4), (results[0] - results[1]).abs().max()
