"""Prompt-to-Prompt: the step schedule, token mapping, the attention rewrite, and whole edits on the
embedded default model (PyTorch)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from close import assert_close_to_scale
from PIL import Image

from icdcli.cli.main import main
from icdcli.diffusion.denoiser import ControlledEps
from icdcli.diffusion.p2p.attention import (
    attention_probabilities,
    controlled_attention,
    edit_probabilities,
    install_p2p_processors,
)
from icdcli.diffusion.p2p.control import StepControl
from icdcli.diffusion.p2p.plan import (
    P2PPlan,
    blend_mask,
    blend_resolution,
    cross_replace_steps,
    local_blend,
    make_plan,
    self_replace_steps,
)
from icdcli.diffusion.p2p.tokens import word_token_positions
from icdcli.diffusion.recipe import P2PError, P2PSettings, SamplerSettings
from icdcli.editing.edits import decode_p2p
from icdcli.editing.generation import decode
from icdcli.editing.inversion import invert
from icdcli.models.sources import DEFAULT_MODEL_DIR

SOURCE = "a red circle on a blue background"
EXAMPLE = DEFAULT_MODEL_DIR.parent.parent / "examples" / "red-circle.png"


def _control(length: int = 5, cross: float = 1.0, self_flag: float = 1.0, **tensors) -> StepControl:
    return StepControl(
        cross_alpha=tensors.get("cross_alpha", torch.full((length,), cross)),
        refine=tensors.get("refine", torch.ones(length)),
        mapper=tensors.get("mapper", torch.eye(length)),
        reweight=tensors.get("reweight", torch.ones(length)),
        self_replace=torch.tensor([self_flag]),
    )


def _probs(batch: int, heads: int, queries: int, keys: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, heads, queries, keys, generator=torch.Generator().manual_seed(seed)), -1)


# --- the step schedule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "fraction", "expected"),
    [
        (4, 1.0, [True] * 4),
        (4, 0.8, [True] * 4),  # int(5 * 0.8) = 4
        (4, 0.6, [True, True, True, False]),  # int(3.0)
        (4, 0.4, [True, True, False, False]),
        (4, 0.2, [True, False, False, False]),
        (4, 0.1, [False] * 4),  # int(0.5) = 0
        (3, 0.5, [True, True, False]),  # int(4 * 0.5) = 2
        (3, 0.8, [True, True, True]),  # int(3.2) = 3
        (3, 0.2, [False] * 3),
    ],
)
def test_cross_replace_covers_a_five_row_table_for_four_steps(steps, fraction, expected):
    assert cross_replace_steps(steps, fraction) == expected


@pytest.mark.parametrize(
    ("steps", "fraction", "expected"),
    [
        (4, 0.4, [True, False, False, False]),  # int(4 * 0.4) = 1
        (4, 0.5, [True, True, False, False]),
        (4, 1.0, [True] * 4),
        (4, 0.2, [False] * 4),
        (3, 0.7, [True, True, False]),  # int(2.1) = 2
        (3, 0.3, [False] * 3),
    ],
)
def test_self_replace_steps(steps, fraction, expected):
    assert self_replace_steps(steps, fraction) == expected


def test_blend_resolution_is_sixteen_for_sd15_at_512():
    assert blend_resolution(64) == 16 and blend_resolution(128) == 32 and blend_resolution(8) == 8
    assert blend_resolution(16) == 16 and blend_resolution(32) == 16  # 16x16 maps where the latents allow
    assert blend_resolution(48) == 24 and blend_resolution(40) == 20  # quarters below 16: the next side the UNet has
    assert blend_resolution(72) == 18 and blend_resolution(96) == 24


# --- token mapping --------------------------------------------------------------------------


def test_word_spans_and_plan_on_the_default_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "pipeline" / "tokenizer")
    assert word_token_positions(tokenizer, SOURCE) == [[i] for i in range(1, 8)]
    plan = make_plan(
        tokenizer,
        SOURCE,
        "a yellow circle on a blue background",
        settings=P2PSettings(blend=("circle",)),
        num_steps=4,
        latent_side=8,
    )
    assert plan.mode == "replace" and torch.equal(plan.mapper, torch.eye(tokenizer.model_max_length))
    assert plan.blend_tokens[0].nonzero().flatten().tolist() == [3] == plan.blend_tokens[1].nonzero().flatten().tolist()
    refine = make_plan(
        tokenizer, SOURCE, "a big red circle on a blue background", settings=P2PSettings(), num_steps=4, latent_side=8
    )
    assert refine.mode == "refine" and refine.refine[2] == 0 and refine.refine.sum() == tokenizer.model_max_length - 1
    with pytest.raises(P2PError, match="neither prompt"):
        make_plan(tokenizer, SOURCE, SOURCE, settings=P2PSettings(blend=("dog",)), num_steps=4, latent_side=8)
    with pytest.raises(P2PError, match="not a word of the target prompt"):
        make_plan(tokenizer, SOURCE, SOURCE, settings=P2PSettings(amplify=(("dog", 2.0),)), num_steps=4, latent_side=8)
    with pytest.raises(P2PError, match="equal word counts"):
        make_plan(
            tokenizer,
            SOURCE,
            "a big red circle on a blue background",
            settings=P2PSettings(mode="replace"),
            num_steps=4,
            latent_side=8,
        )


# --- the attention rewrite ------------------------------------------------------------------


def test_cross_replace_gives_the_target_the_source_maps_and_leaves_other_rows():
    probs = _probs(4, 2, 6, 5)  # [source uncond, target uncond, source, target]
    out = edit_probabilities(probs, is_cross=True, control=_control())
    assert torch.equal(out[-1], probs[-2]) and torch.equal(out[:3], probs[:3])
    assert torch.equal(
        edit_probabilities(probs, is_cross=True, control=_control(cross=0.0)), probs
    )  # outside the steps


def test_cross_mapping_refine_and_reweight():
    probs = _probs(2, 1, 3, 4, seed=1)
    swap = torch.eye(4)[[0, 2, 1, 3]]  # source token 1 -> target token 2 and back
    mapped = edit_probabilities(probs, is_cross=True, control=_control(4, mapper=swap))
    assert torch.equal(mapped[1][..., 2], probs[0][..., 1]) and torch.equal(mapped[1][..., 1], probs[0][..., 2])
    refine = torch.tensor([1.0, 1.0, 0.0, 1.0])  # token 2 is new: it keeps the target's own map
    refined = edit_probabilities(probs, is_cross=True, control=_control(4, refine=refine))
    assert torch.equal(refined[1][..., 2], probs[1][..., 2]) and torch.equal(refined[1][..., 0], probs[0][..., 0])
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])
    amplified = edit_probabilities(probs, is_cross=True, control=_control(4, reweight=weights))
    assert torch.allclose(amplified[1][..., 1], 3 * probs[0][..., 1])


def test_self_replace_only_within_its_steps_and_on_small_maps():
    probs = _probs(2, 2, 16, 16)
    assert torch.equal(edit_probabilities(probs, is_cross=False, control=_control(self_flag=1.0))[1], probs[0])
    assert torch.equal(edit_probabilities(probs, is_cross=False, control=_control(self_flag=0.0)), probs)
    large = _probs(2, 1, 32 * 32 + 1, 8)
    assert torch.equal(edit_probabilities(large, is_cross=False, control=_control(self_flag=1.0)), large)


@pytest.mark.parametrize("is_cross", [True, False])
@pytest.mark.parametrize(("groups", "pairs"), [(1, 1), (1, 3), (2, 2)])
def test_controlled_attention_equals_the_edited_probabilities_times_the_values(is_cross, groups, pairs):
    """The P2P graph's attention never builds the edited probabilities; its output must still be exactly what they
    give: every pair its own mapper, refine, reweight and flags (fractional ones too), real CFG's rows left alone."""
    rows, heads, queries, length, width = 2 * pairs * groups, 2, 6 if is_cross else 16, 5, 3
    keys = length if is_cross else queries
    generator = torch.Generator().manual_seed(pairs * 10 + groups)
    probs = _probs(rows, heads, queries, keys, seed=pairs + groups)
    values = torch.randn(rows, heads, keys, width, generator=generator)
    control = StepControl(
        cross_alpha=torch.rand(pairs, length, generator=generator).round() * 0.75 + 0.25,
        refine=torch.rand(pairs, length, generator=generator).round(),
        mapper=torch.stack([torch.eye(length)[torch.randperm(length, generator=generator)] for _ in range(pairs)]),
        reweight=torch.rand(pairs, length, generator=generator) * 2,
        self_replace=torch.tensor([[1.0], [0.0], [0.5]])[:pairs],
    )
    expected = edit_probabilities(probs, is_cross=is_cross, control=control) @ values
    got = controlled_attention(probs, values, is_cross=is_cross, control=control)
    assert got.shape == expected.shape
    assert_close_to_scale(got, expected, rel=1e-5)
    untouched = rows - 2 * pairs
    if untouched:
        assert_close_to_scale(got[:untouched], probs[:untouched] @ values[:untouched], rel=1e-6)


def test_attention_probabilities_are_diffusers_attention_scores():
    """Without diffusers' baddbmm placeholder (three wasted passes in an ONNX graph) the probabilities are the same."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8)
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(4, 10, 8, generator=generator), torch.randn(4, 7, 8, generator=generator)
    mask = torch.randn(4, 10, 7, generator=generator)
    for given in (None, mask):
        expected = attn.get_attention_scores(query, key, given)
        assert_close_to_scale(attention_probabilities(attn, query, key, given), expected, rel=1e-6)


def test_local_blend_keeps_the_source_outside_the_words_region():
    size = 4
    maps = torch.zeros(2, size * size, 5)
    maps[0, 5, 2] = 1.0  # source word (token 2) at query (1, 1)
    maps[1, 10, 3] = 1.0  # target word (token 3) at query (2, 2)
    tokens = torch.zeros(2, 5)
    tokens[0, 2] = tokens[1, 3] = 1.0
    mask = blend_mask(maps, tokens, size=size, latent_hw=(4, 4), threshold=0.3)
    expected = torch.zeros(4, 4)
    expected[0:3, 0:3] = 1  # 3x3 max-pool around (1, 1) ...
    expected[1:4, 1:4] = 1  # ... united with the one around (2, 2)
    assert torch.equal(mask[0, 0], expected)
    x = torch.randn(2, 4, 4, 4)
    blended = local_blend(x, mask)
    assert torch.equal(blended[0], x[0]) and torch.equal(blended[1][:, 3, 0], x[0][:, 3, 0])
    assert torch.allclose(blended[1][:, 1, 1], x[1][:, 1, 1])


def test_processors_without_control_are_the_fused_attention(merged_model):
    unet = copy.deepcopy(merged_model.reverse_unet)  # installing processors must not touch the shared model
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 12, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    cond = torch.zeros(2, unet.config.time_cond_proj_dim) if unet.config.time_cond_proj_dim else None
    with torch.no_grad():
        before = unet(x, t, hidden, timestep_cond=cond).sample
        install_p2p_processors(unet)
        after = unet(x, t, hidden, timestep_cond=cond).sample
        explicit = unet(x, t, hidden, timestep_cond=cond, cross_attention_kwargs={"control": _control(12, 0.0, 0.0)})
    assert torch.equal(before, after)
    assert_close_to_scale(explicit.sample, before)  # explicit softmax path, no edit


# --- whole edits on the default model -------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    from icdcli.models.sources import ModelRequest, load_requested_model

    return load_requested_model(ModelRequest(None, None, None, None, None), need_teacher=True)


def _branches(model, target: str, guidance: float, settings: P2PSettings, sampler: SamplerSettings = None):
    """A real `decode_p2p` edit of the example; (its inversion, both branches' final latents read off the step
    callback: source, target)."""
    sampler = sampler or SamplerSettings()
    image = Image.open(EXAMPLE).convert("RGB")
    inversion = invert(model, image, SOURCE, settings=sampler)
    return inversion, _decode_branches(model, inversion.latents, SOURCE, target, inversion.size, guidance, settings,
                                       sampler)  # fmt: skip


def _decode_branches(model, latents, source, target, size, guidance, settings, sampler=None):
    steps = []
    sampler = sampler or SamplerSettings()
    decode_p2p(model, latents, source, target, size=size, guidance=guidance, tau=0.8, settings=sampler, p2p=settings,
               callback=lambda index, t, x: steps.append(x))  # fmt: skip
    return steps[-1]


def test_identical_prompts_with_full_replace_decode_the_target_as_the_source(default_model):
    full = P2PSettings(cross_replace=1.0, self_replace=1.0)
    inversion, both = _branches(default_model, SOURCE, 1.0, full)
    assert_close_to_scale(both[1], both[0])
    plain = decode(
        default_model, inversion.latents, SOURCE, size=inversion.size, guidance=1.0, tau=0.8, settings=SamplerSettings()
    )
    assert torch.allclose(default_model.decode_latents(both[:1]), plain, atol=1e-4)  # the source is untouched


def _unet_calls(unet, record: list):
    """Record (batch, under control) of each call of `unet`; returns the hook's handle."""

    def hook(module, args, kwargs):
        record.append((args[0].shape[0], (kwargs.get("cross_attention_kwargs") or {}).get("control") is not None))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_steps_after_the_last_control_decode_the_target_rows_alone(default_model, monkeypatch):
    """The release's recipe edits attention in steps 0-1 only and has no local blend: steps 2-3 decode the target
    rows alone, which changes them only by rounding (rows of a batch are independent without control)."""
    model, target = default_model, "a yellow circle on a blue background"
    inversion = invert(model, Image.open(EXAMPLE).convert("RGB"), SOURCE, settings=SamplerSettings())
    settings = P2PSettings(cross_replace=0.3, self_replace=0.6)
    plan = make_plan(
        model.tokenizers[0], SOURCE, target, settings=settings, num_steps=4, latent_side=inversion.latents.shape[-1]
    )
    assert [plan.reads_source(index) for index in range(4)] == [True, True, False, False]
    seen: list = []
    handle = _unet_calls(model.reverse_unet, seen)
    try:
        short = _decode_branches(model, inversion.latents, SOURCE, target, inversion.size, 4.0, settings)
    finally:
        handle.remove()
    assert seen == [(2, True), (2, True), (1, False), (1, False)]
    with monkeypatch.context() as patched:
        patched.setattr(P2PPlan, "reads_source", lambda self, index: True)  # every step on both branches
        full = _decode_branches(model, inversion.latents, SOURCE, target, inversion.size, 4.0, settings)
    assert_close_to_scale(short[1::2], full[1::2], rel=1e-5)
    assert (short[0] - full[0]).abs().max() > 0  # the source row stopped at the cut
    blended = make_plan(
        model.tokenizers[0], SOURCE, target, settings=replace(settings, blend=("circle",)), num_steps=4, latent_side=8
    )
    assert all(blended.reads_source(index) for index in range(4))  # local blend reads the source at every step


def test_the_source_branch_ignores_the_target_and_its_guidance(default_model):
    inversion, both = _branches(default_model, "a yellow circle on a blue background", 4.0, P2PSettings())
    plain = decode(
        default_model, inversion.latents, SOURCE, size=inversion.size, guidance=1.0, tau=0.8, settings=SamplerSettings()
    )
    assert torch.allclose(default_model.decode_latents(both[:1]), plain, atol=1e-4)
    assert (both[1] - both[0]).abs().max() > 0.1  # the target did change


def test_local_blend_holds_the_unmasked_latents_exactly(default_model):
    target = "a yellow circle on a blue background"
    # The embedded model's word maps localise (16x16 cross-attention): at P2P's threshold of 0.3 local blend edits
    # the circle's region and holds the rest of the latent exactly; without blend every latent may change.
    _, both = _branches(default_model, target, 4.0, P2PSettings(blend=("circle",)))
    same = (both[1] - both[0]).abs().amax(0) == 0
    assert 0.2 < same.float().mean() < 0.95, same.float().mean()  # part of the latent kept exactly, part edited
    _, unblended = _branches(default_model, target, 4.0, P2PSettings())
    assert ((unblended[1] - unblended[0]).abs().amax(0) > 0).float().mean() > 0.95


def test_ddim_baseline_p2p_takes_one_teacher_call_per_ddim_step(default_model):
    calls = []
    hook = default_model.teacher_unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        sampler = SamplerSettings("ddim", 10)
        _, both = _branches(default_model, "a yellow circle on a blue background", 4.0, P2PSettings(), sampler)
    finally:
        hook.remove()
    # ten inversion steps, then both branches at once while cross-replace 0.8 edits attention (int(11 * 0.8) = 8
    # steps), then the target alone
    assert calls == [1] * 10 + [2] * 8 + [1] * 2
    assert both.shape[0] == 2 and torch.isfinite(both).all()


@pytest.mark.slow
def test_cli_p2p_edit_records_its_settings_and_explains_refine(tmp_path):
    out = tmp_path / "edit.png"
    args = ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", "a yellow circle on a blue background", "-o", str(out),
            "--blend", "circle", "--amplify", "yellow=1.5", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[0])
    assert line["method"] == "p2p"
    from icdcli.io.images import read_record

    record = read_record(out)
    # the embedded model's recipe, and the flags
    assert record["p2p"] == {"cross_replace": 0.3, "self_replace": 0.6, "mode": "auto", "blend": ["circle"],
                             "blend_source": [], "blend_target": [], "blend_threshold": 0.3,
                             "amplify": {"yellow": 1.5}, "amplify_new": 4.0}  # fmt: skip
    edited = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert edited[:16, :16].reshape(-1, 3).mean(0)[2] > 150  # the blue background stays blue
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads(again.stdout.strip().splitlines()[0])["status"] == "skipped"
    refine = CliRunner().invoke(
        main, ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", "a big red circle on a blue background", "-o",
               str(tmp_path / "big.png")],
    )  # fmt: skip
    assert refine.exit_code == 0 and "refines instead" in refine.output


@pytest.mark.slow
def test_replace_tail_from_flags_spec_rows_and_records_reaches_the_mapper(tmp_path, monkeypatch):
    import icdcli.diffusion.p2p.plan
    from icdcli.io.images import read_record

    seen = []
    real = icdcli.diffusion.p2p.plan.replacement_mapper

    def spy(*args, **kwargs):
        seen.append(kwargs.get("shift_tail", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(icdcli.diffusion.p2p.plan, "replacement_mapper", spy)
    target = "a yellow circle on a blue background"
    out = tmp_path / "release.png"
    args = ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", target, "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--replace-tail", "release"])
    assert result.exit_code == 0, result.output
    assert seen == [True] and read_record(out)["p2p"]["replace_tail"] == "release"
    again = CliRunner().invoke(main, ["edit", "--from", str(out), "-o", str(tmp_path / "again.png")])
    assert again.exit_code == 0, again.output
    assert seen == [True, True] and read_record(tmp_path / "again.png")["p2p"]["replace_tail"] == "release"
    # the embedded model's word-level tokens: equal word counts are equal token counts, the same pixels
    default = tmp_path / "aligned.png"
    assert CliRunner().invoke(main, [*args[:-1], str(default)]).exit_code == 0
    assert seen[-1] is False and "replace_tail" not in read_record(default)["p2p"]
    assert np.array_equal(np.asarray(Image.open(default)), np.asarray(Image.open(out)))
    # a resume compares the rule: a release output is not the default edit
    differs = CliRunner().invoke(main, [*args[:-1], str(out)])
    assert differs.exit_code == 1 and "replace_tail" in differs.output and "--overwrite" in differs.output
    # spec rows: per row, checked like a flag; a bad value fails its row alone
    row = {"image": str(EXAMPLE), "src": SOURCE, "tgt": target}
    rows = [{**row, "output": "r.png", "replace_tail": "release"}, {**row, "output": "a.png"},
            {**row, "output": "x.png", "replace_tail": "icd"}]  # fmt: skip
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    batch = CliRunner().invoke(main, ["edit", "--spec", str(spec), "-o", str(tmp_path / "rows"), "--json"])
    lines = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [line["status"] for line in lines] == ["done", "done", "failed", "summary"], batch.output
    assert "replace_tail must be aligned or release" in lines[2]["error"]
    assert read_record(tmp_path / "rows" / "r.png")["p2p"]["replace_tail"] == "release"
    assert "replace_tail" not in read_record(tmp_path / "rows" / "a.png")["p2p"]
    bad = CliRunner().invoke(main, [*args, "--replace-tail", "shifted"])
    assert bad.exit_code == 2 and "--replace-tail" in bad.output


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        (["--blend", "dog"], "--blend word 'dog' is in neither prompt", 1),
        (["--amplify", "red"], "'red': write WORD=FACTOR", 2),  # a usage error, before any work
        (["--amplify", "dog=2"], "not a word of the target prompt", 1),
    ],
)
def test_cli_p2p_errors_are_one_line(tmp_path, extra, message, code):
    out = tmp_path / "edit.png"
    result = CliRunner().invoke(
        main, ["edit", str(EXAMPLE), "--src", SOURCE, "--tgt", SOURCE, "-o", str(out), *extra]
    )  # fmt: skip
    assert result.exit_code == code and message in result.output and not out.exists()
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_p2p_on_tiny_models_of_both_families(family, merged_model, sdxl_parts):
    """Identical prompts unguided: the branches agree; another prompt under guidance: they differ."""
    if family == "sdxl":
        from test_export import sdxl_model

        model = sdxl_model(sdxl_parts)
    else:
        model = merged_model
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    source, target = "a red cat on a blue background", "a green dog on a blue background"
    x0 = model.encode_image(pixels)
    from icdcli.editing.generation import invert_latents

    latents = invert_latents(model, x0, source, size=(32, 32), settings=SamplerSettings())
    results = []
    for tgt, guidance in ((source, 1.0), (target, 6.0)):
        blend = ("cat",) if tgt == source else ("cat", "dog")
        results.append(_decode_branches(model, latents, source, tgt, (32, 32), guidance, P2PSettings(blend=blend)))
    assert_close_to_scale(results[0][0], results[0][1])
    assert (results[1][1] - results[1][0]).abs().max() > 1e-3 and torch.isfinite(results[1]).all()


def test_layers_a_step_leaves_alone_keep_the_fused_kernel():
    from icdcli.diffusion.p2p.attention import _touches

    quiet = replace(_control(), cross_active=False, self_active=False)
    assert not _touches(quiet, True, 64) and not _touches(quiet, False, 64)
    assert _touches(replace(quiet, blend_queries=64), True, 64)  # local blend still reads these maps
    assert not _touches(replace(quiet, blend_queries=64), True, 256)
    busy = _control()
    assert _touches(busy, True, 4096) and _touches(busy, False, 1024) and not _touches(busy, False, 1025)
    plan_step = make_plan_for_steps().step(3)  # 4 steps, self-replace 0.4: only step 0 replaces self-attention
    assert plan_step.cross_active and not plan_step.self_active


def make_plan_for_steps():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "pipeline" / "tokenizer")
    return make_plan(tokenizer, SOURCE, SOURCE, settings=P2PSettings(), num_steps=4, latent_side=8)


# --- the seam: a controlled step, the P2P denoiser wrapper and its step hook ----------------------------


def test_a_controlled_unet_step_returns_its_maps_once_the_caller_installed_the_processors():
    from tiny import make_teacher

    from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding, UNetDenoiser
    from icdcli.diffusion.p2p.attention import has_p2p_processors

    unet = make_teacher("sd15")
    denoiser = UNetDenoiser(unet)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = Conditioning(PromptEmbedding(torch.randn(2, 12, 32, generator=generator)))
    control = replace(_control(12), blend_queries=64)
    plain = denoiser(x, 500, cond, 4.0)
    with pytest.raises(RuntimeError, match="install_control"):
        denoiser.controlled(x, 500, cond, 4.0, control)
    assert not has_p2p_processors(unet)  # a controlled call installs nothing into the caller's UNet
    denoiser.install_control()
    assert torch.equal(denoiser(x, 500, cond, 4.0), plain)  # without control the processors are the fused kernel
    step = denoiser.controlled(x, 500, cond, 4.0, control)
    # the 8x8 cross-attention layers: one down, two up; each (source, target) rows, 64 queries, 12 tokens
    assert [tuple(m.shape) for m in step.maps] == [(2, 64, 12)] * 3
    assert torch.allclose(step.maps[0].sum(-1), torch.ones(2, 64))  # head-averaged probabilities
    scale = float(plain.abs().max())
    assert (step.eps[1] - plain[1]).abs().max() > 1e-4 * scale  # the target row is edited
    assert torch.allclose(step.eps[0], plain[0], rtol=1e-4, atol=1e-5 * scale)  # the source row is not
    quiet = denoiser.controlled(x, 500, cond, 4.0, replace(control, blend_queries=None))
    assert quiet.maps == () and torch.equal(quiet.eps, step.eps)


class _FakeNetwork:
    """eps = x / 2 for any row; records each call as (kind, t, rows, guidance of the rows)."""

    def __init__(self, maps: torch.Tensor):
        self.maps, self.calls = maps, []

    def __call__(self, x, t, cond, guidance=1.0):
        assert cond.prompt.hidden_states.shape[0] == x.shape[0]
        self.calls.append(("plain", t, x.shape[0], torch.as_tensor(guidance).reshape(-1).tolist()))
        return x / 2

    def install_control(self):
        raise AssertionError("p2p_decode leaves installing to its caller")

    def controlled(self, x, t, cond, guidance, control):
        self.calls.append(("controlled", t, x.shape[0], torch.as_tensor(guidance).reshape(-1).tolist()))
        return ControlledEps(x / 2, (self.maps,))


class _FakePlan:
    """Controls steps 0-1 only; records the maps it gets and the steps it blends."""

    def __init__(self):
        self.maps, self.blended = [], 0

    def step(self, index):
        return replace(_control(3), blend_queries=4)

    def reads_source(self, index):
        return index < 2

    def add_maps(self, maps):
        self.maps.append(maps)

    def blend(self, x, index):
        self.blended += 1
        return x


def test_p2p_runs_in_the_sampler_loop_as_a_denoiser_wrapper_and_a_step_hook():
    from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding
    from icdcli.diffusion.sampler import ddim_jump, p2p_decode
    from icdcli.diffusion.schedule import NoiseSchedule, reverse_pairs

    schedule, pairs = NoiseSchedule.stable_diffusion(), reverse_pairs((259, 519, 779, 999))
    maps = torch.rand(2, 4, 3)
    network, plan = _FakeNetwork(maps), _FakePlan()
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(PromptEmbedding(torch.zeros(2, 3, 4)))
    seen = []
    both = p2p_decode(network, x, cond, pairs, 4.0, 0.8, schedule, plan, lambda i, s, latents: seen.append(latents))
    assert network.calls == [
        ("controlled", 999, 2, [1.0, 1.0]),  # above tau: the target unguided too
        ("controlled", 779, 2, [1.0, 4.0]),
        ("plain", 519, 1, [4.0]),  # nothing reads the source rows any more: the target rows alone
        ("plain", 259, 1, [4.0]),
    ]
    assert len(plan.maps) == 2 and all(got == (maps,) for got in plan.maps) and plan.blended == 2
    expected = x
    for index, (t, s) in enumerate(pairs):
        expected = ddim_jump(expected, expected / 2, t, s, schedule)
        if index == 1:
            assert torch.equal(both[0], expected[0])  # the source row stopped after step 1
    assert torch.equal(both[1], expected[0]) and torch.equal(seen[-1], both) and len(seen) == 4
