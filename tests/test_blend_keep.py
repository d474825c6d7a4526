"""Local blend that keeps the inversion's own latents outside the edited region (`--blend-keep inversion`): after
each step the target takes the inversion's latents of that timestep there, the photo's own latents after the last."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from icdcli.diffusion.p2p.plan import blend_mask, local_blend
from icdcli.diffusion.recipe import EditRecipe, P2PError, P2POptions, P2PSettings, SamplerSettings
from icdcli.editing.edits import EditJob, decode_p2p_jobs, edit
from icdcli.editing.inversion import (
    TRAJECTORY_PREFIX,
    InversionError,
    edit_inversion,
    invert_for_edit,
    load_inversion,
    save_inversion,
)
from icdcli.editing.stages import encode_prompts, invert_rows
from icdcli.io.images import image_to_tensor, read_record

SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def model():
    from icdcli.pipeline import ICDEditPipeline

    return ICDEditPipeline.from_pretrained(device="cpu").model


@pytest.fixture(scope="module")
def photo():
    from icdcli.training.scenes import Scene

    return Image.fromarray(Scene("circle", "red", "blue", 0.5, 0.5, 0.3).render(32))


def test_local_blend_keeps_what_it_is_given_outside_the_mask():
    x = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    kept = torch.full((1, 1, 2, 2), 5.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    branch = local_blend(x, mask)
    inversion = local_blend(x, mask, kept)
    assert torch.equal(inversion[0], x[0]) and torch.equal(branch[0], x[0])  # the source row is never touched
    assert inversion[1, 0, 0, 0] == 2.0 and branch[1, 0, 0, 0] == 2.0  # inside: the target's own
    assert torch.all(inversion[1, 0].flatten()[1:] == 5.0) and torch.all(branch[1, 0].flatten()[1:] == 1.0)


def test_blend_keep_is_checked_recorded_and_read_back():
    with pytest.raises(P2PError, match="blend_keep must be source or inversion"):
        P2PSettings(blend_keep="photo")
    assert "blend_keep" not in P2PSettings().to_record()  # records of the default stay as they were
    settings = P2PSettings(blend=("cat",), blend_keep="inversion")
    assert settings.keeps_inversion and not P2PSettings(blend_keep="inversion").keeps_inversion  # no words: no blend
    record = settings.to_record()
    assert record["blend_keep"] == "inversion"
    assert P2POptions.from_record(record).resolve(EditRecipe()).blend_keep == "inversion"
    with pytest.raises(ValueError, match="blend_keep"):
        P2POptions.from_record({**record, "blend_keep": "nothing"})


def _decode_with_steps(model, photo, keep: str, settings: SamplerSettings = SamplerSettings("icd", 50, 0)):
    """The latents after each step of a P2P edit blending on the colour word, the inversion's trajectory, and the
    blend mask after the last step."""
    size = (32, 32)
    p2p = P2POptions(blend_source=("red",), blend_target=("yellow",), blend_keep=keep).resolve(model.info.edit)
    recipe = model.info.edit
    job = EditJob(photo, SOURCE, TARGET, recipe.guidance, recipe.tau, 0, p2p)
    with torch.no_grad():
        x0 = model.encode_image(image_to_tensor(photo, size))
        trajectory: dict[int, torch.Tensor] = {}
        cond = encode_prompts(model, [SOURCE], size).conditioning([SOURCE])
        latents = invert_rows(model, x0, [0], settings, cond, trajectory)
        steps: list[tuple[int, torch.Tensor]] = []
        _, plans = decode_p2p_jobs(
            model, latents, [job], size=size, settings=settings, trajectory=trajectory,
            callback=lambda index, t, x: steps.append((t, x.clone())),
        )  # fmt: skip
    plan = plans[0]
    mask = blend_mask(plan.map_sum, plan.blend_tokens, size=plan.blend_size, latent_hw=x0.shape[-2:],
                      threshold=plan.blend_threshold)[0, 0].bool()  # fmt: skip
    return steps, trajectory, mask


def test_the_target_keeps_the_inversions_latents_outside_the_region_at_every_step(model, photo):
    steps, trajectory, mask = _decode_with_steps(model, photo, "inversion")
    assert set(trajectory) == {0, 259, 519, 779, 999}
    assert 0 < int(mask.sum()) < mask.numel(), "the colour word's region is part of the image"
    outside = ~mask
    t, last = steps[-1]
    assert t == 0
    assert torch.equal(last[1][:, outside], trajectory[0][0][:, outside]), "the photo's own latents outside"
    assert not torch.equal(last[1][:, mask], trajectory[0][0][:, mask]), "the region is edited"
    for t, x in steps[:-1]:  # earlier steps: the inversion's latents of that timestep, outside that step's mask
        kept = (x[1] == trajectory[t][0]).all(dim=0)
        assert 0 < int(kept.sum()) < kept.numel(), t
    branch_steps, _, branch_mask = _decode_with_steps(model, photo, "source")
    _, branch_last = branch_steps[-1]
    assert torch.equal(branch_last[1][:, ~branch_mask], branch_last[0][:, ~branch_mask]), "P2P's rule: the source"
    assert not torch.equal(branch_last[1][:, ~branch_mask], trajectory[0][0][:, ~branch_mask])


def test_an_inversion_without_its_steps_is_refused_only_where_they_are_needed(model, photo, tmp_path):
    settings = SamplerSettings("icd", 50, 0)
    inversion = invert_for_edit(model, photo, SOURCE, settings)
    path = tmp_path / "x.safetensors"
    save_inversion(inversion, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # the last step's latents are the file's `latents`
        assert {f"{TRAJECTORY_PREFIX}{t}" for t in (0, 259, 519, 779)} == set(handle.keys()) - {"latents"}
        assert handle.metadata()["trajectory_final"] == "999"
    loaded = load_inversion(path)
    assert loaded.trajectory is not None and loaded.trajectory.keys() == inversion.trajectory.keys()
    assert all(torch.equal(loaded.trajectory[t], inversion.trajectory[t].cpu()) for t in inversion.trajectory)
    loaded.trajectory = None  # as a file of an earlier icd reads
    recipe = model.info.edit
    keep = P2POptions(blend=("red", "yellow"), blend_keep="inversion").resolve(recipe)
    with pytest.raises(InversionError, match="blend-keep source"):
        edit_inversion(model, loaded, TARGET, guidance=recipe.guidance, tau=recipe.tau, settings=settings, p2p=keep)
    plain = P2POptions(blend=("red", "yellow")).resolve(recipe)
    edit_inversion(model, loaded, TARGET, guidance=recipe.guidance, tau=recipe.tau, settings=settings, p2p=plain)


def test_keeping_the_inversion_keeps_more_of_the_photo_than_the_source_branch(model, photo):
    """Outside the word's region the result is the photo as the VAE gives it back: closer to it than P2P's rule."""
    recipe = model.info.edit
    settings = SamplerSettings("icd", 50, 0)
    words = {"blend_source": ("red",), "blend_target": ("yellow",)}
    source_pixels = np.asarray(photo).astype(float)
    region = np.asarray(photo.convert("RGB")).astype(int)
    background = np.all(region == region[0, 0], axis=-1)  # the blue background: outside the circle
    errors = {}
    for keep in ("source", "inversion"):
        p2p = P2POptions(**words, blend_keep=keep).resolve(recipe)
        result = edit(model, photo, SOURCE, TARGET, guidance=recipe.guidance, tau=recipe.tau, settings=settings,
                      p2p=p2p)  # fmt: skip
        errors[keep] = float(np.abs(np.asarray(result).astype(float) - source_pixels)[background].mean())
    assert errors["inversion"] < errors["source"], errors


def test_icd_edit_records_blend_keep(tmp_path, photo):
    from icdcli.cli.main import main

    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    result = CliRunner().invoke(main, ["edit", str(photo_path), "--src", SOURCE, "--tgt", TARGET, "--method", "p2p",
                                       "--blend", "red yellow", "--blend-keep", "inversion", "-o",
                                       str(tmp_path / "out.png"), "--json", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = read_record(tmp_path / "out.png")
    assert record["p2p"]["blend_keep"] == "inversion"
    again = CliRunner().invoke(main, ["edit", "--from", str(tmp_path / "out.png"), "-o", str(tmp_path / "again.png"),
                                      "--device", "cpu"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "out.png")))
    bad = CliRunner().invoke(main, ["edit", str(photo_path), "--src", SOURCE, "--tgt", TARGET, "--blend-keep", "x"])
    assert bad.exit_code == 2 and "--blend-keep" in bad.output
    assert json.loads(result.output.strip().splitlines()[-1])["status"] == "done"


def test_ddim_decoding_keeps_the_ddim_inversions_latents(photo):
    """DDIM's decoding steps land on the timesteps its inversion passed, then on 0."""
    from icdcli.diffusion.schedule import ddim_timesteps
    from icdcli.models.sources import ModelRequest, load_requested_model

    with_teacher = load_requested_model(ModelRequest(None, None, None, None, None), need_teacher=True)
    steps, trajectory, mask = _decode_with_steps(with_teacher, photo, "inversion", SamplerSettings("ddim", 6, 0))
    assert 0 < int(mask.sum()) < mask.numel()
    timesteps = ddim_timesteps(6)  # 1, 167, ..., 835
    assert [t for t, _ in steps] == timesteps[::-1][1:] + [0] and set(trajectory) == {0, *timesteps}
    t, last = steps[-1]
    assert torch.equal(last[1][:, ~mask], trajectory[0][0][:, ~mask])


def test_p2p_flags_on_a_swap_run_get_a_note(tmp_path, photo):
    from icdcli.cli.main import main

    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    args = ["edit", str(photo_path), "--src", SOURCE, "--tgt", TARGET, "--blend", "red", "--blend-keep", "inversion",
            "-o", str(tmp_path / "out.png"), "--device", "cpu"]  # fmt: skip
    swap = CliRunner().invoke(main, [*args, "--method", "swap"])
    assert swap.exit_code == 0, swap.output
    assert "--blend, --blend-keep not used: this run edits by prompt swap" in swap.output
    p2p = CliRunner().invoke(main, [*args, "--method", "p2p", "--overwrite"])
    assert p2p.exit_code == 0 and "not used" not in p2p.output, p2p.output


def test_a_batch_keeps_each_edits_own_inversion(model, photo):
    """In one batch, each edit keeping the inversion keeps its own row's latents: the same pixels as alone."""
    from icdcli.editing.edits import edit_batch
    from icdcli.training.scenes import Scene

    recipe = model.info.edit
    other = Image.fromarray(Scene("square", "red", "green", 0.4, 0.6, 0.4).render(32))
    other_source = "a red square on a green background"
    keep = P2POptions(blend_source=("red",), blend_target=("yellow",), blend_keep="inversion").resolve(recipe)
    plain = P2POptions(blend_source=("red",), blend_target=("yellow",)).resolve(recipe)
    jobs = [
        EditJob(photo, SOURCE, TARGET, recipe.guidance, recipe.tau, 0, keep),
        EditJob(other, other_source, "a yellow square on a green background", recipe.guidance, recipe.tau, 1, keep),
        EditJob(other, other_source, "a yellow square on a green background", recipe.guidance, recipe.tau, 1, plain),
    ]
    settings = SamplerSettings("icd", 50, 0)
    together = edit_batch(model, jobs, settings=settings)
    for job, result in zip(jobs, together, strict=True):
        (alone,) = edit_batch(model, [job], settings=settings)
        difference = np.abs(np.asarray(result).astype(int) - np.asarray(alone).astype(int))
        assert difference.max() <= 1, difference.max()  # batching changes nothing beyond rounding
    assert np.abs(np.asarray(together[1]).astype(int) - np.asarray(together[2]).astype(int)).max() > 0
