"""A photo is inverted once however many edits take it: edits of a batch that share a photo, a source prompt and a
seed share one inversion, and an `InversionCache` (the run's, the pipeline's) carries it to later batches. The
results are the edits' own, only the forward-model calls are saved."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import icdcli.editing.reuse as reuse
from icdcli.bench.scenes import edit_pairs
from icdcli.cli.common import load_model
from icdcli.cli.main import main
from icdcli.diffusion.recipe import P2POptions, SamplerSettings
from icdcli.editing.edits import EditJob, edit_batch
from icdcli.editing.reuse import InversionCache, Inverted, model_inversions
from icdcli.io.images import read_record

MODEL_OPTIONS = {"model": None, "base": None, "teacher": None, "forward_lora": None, "reverse_lora": None,
                 "device": "cpu", "precision": None}  # fmt: skip
ROUNDING_LEVELS = 2  # 8-bit levels between an edit made alone and in a batch (tests/test_throughput.py)
SETTINGS = SamplerSettings("icd", 50, 0)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_OPTIONS, need_teacher=False, backend="torch").model


@pytest.fixture()
def inverted_rows_seen(monkeypatch):
    """The number of rows of every inversion run, in order."""
    seen: list[int] = []
    original = reuse.invert_rows

    def counting(model, x0, seeds, settings, cond, trajectory=None):
        seen.append(x0.shape[0])
        return original(model, x0, seeds, settings, cond, trajectory)

    monkeypatch.setattr(reuse, "invert_rows", counting)
    return seen


def _scenes(count: int) -> list[tuple[Image.Image, str, str]]:
    """`count` held-out scenes of different photos, each with a target."""
    scenes: dict[str, tuple[Image.Image, str, str]] = {}
    for source, target, _ in edit_pairs(8 * count):
        scenes.setdefault(source.caption(), (Image.fromarray(source.render(32)), source.caption(), target.caption()))
    return list(scenes.values())[:count]


def _jobs(model, method: str) -> list[EditJob]:
    """Two targets of one photo, a third of another, and the first photo again under another seed."""
    p2p = P2POptions().resolve(model.info.edit) if method == "p2p" else None
    (one, source, target), (two, source_two, target_two) = _scenes(2)
    return [
        EditJob(one, source, target, 4.0, 0.8, 7, p2p),
        EditJob(one.copy(), source, target_two, 3.0, 0.6, 7, p2p),  # the same pixels in another image object
        EditJob(two, source_two, target_two, 4.0, 0.8, 7, p2p),
        EditJob(one, source, target, 4.0, 0.8, 8, p2p),
    ]


def _levels(first: Image.Image, second: Image.Image) -> int:
    return int(np.abs(np.asarray(first, dtype=int) - np.asarray(second, dtype=int)).max())


@pytest.mark.parametrize("method", ["swap", "p2p"])
def test_edits_of_one_photo_share_its_inversion_and_keep_their_results(model, inverted_rows_seen, method):
    jobs = _jobs(model, method)
    alone = [edit_batch(model, [job], settings=SETTINGS)[0] for job in jobs]
    assert inverted_rows_seen == [1, 1, 1, 1]
    together = edit_batch(model, jobs, settings=SETTINGS)
    assert inverted_rows_seen[4:] == [3]  # the second job's photo (same pixels, source, seed) is not inverted again
    for one, batched in zip(alone, together, strict=True):
        assert _levels(one, batched) <= ROUNDING_LEVELS
    assert _levels(together[0], together[1]) > ROUNDING_LEVELS  # each target is its own edit
    assert _levels(together[0], together[3]) > ROUNDING_LEVELS  # another seed is another inversion


def test_a_cache_carries_inversions_to_later_batches(model, inverted_rows_seen):
    jobs = _jobs(model, "swap")
    cache = InversionCache()
    first = edit_batch(model, jobs[:1], settings=SETTINGS, inversions=cache)
    assert inverted_rows_seen == [1] and len(cache.entries) == 1
    again = edit_batch(model, jobs[1:3], settings=SETTINGS, inversions=cache)
    assert inverted_rows_seen == [1, 1] and cache.hits == 1  # only the other photo is inverted
    assert _levels(again[0], edit_batch(model, jobs[1:2], settings=SETTINGS)[0]) <= ROUNDING_LEVELS
    # the cached inversion is not changed by the decodes that start from it
    repeat = edit_batch(model, jobs[:1], settings=SETTINGS, inversions=cache)
    assert inverted_rows_seen == [1, 1, 1]  # the uncached call above
    assert _levels(first[0], repeat[0]) == 0
    # another sampler or another photo is another inversion
    edit_batch(model, [replace(jobs[0], image=jobs[0].image.rotate(90))], settings=SETTINGS, inversions=cache)
    assert inverted_rows_seen[-1] == 1 and len(cache.entries) == 3


def test_an_edit_that_needs_the_trajectory_does_not_take_an_inversion_kept_without_it(model, inverted_rows_seen):
    image, source, target = _scenes(1)[0]
    cache = InversionCache()
    plain = EditJob(image, source, target, 4.0, 0.8, 7)
    edit_batch(model, [plain], settings=SETTINGS, inversions=cache)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (16, 0, 32, 32))
    masked = replace(plain, mask=mask)
    fresh = edit_batch(model, [masked], settings=SETTINGS)[0]
    reused = edit_batch(model, [masked], settings=SETTINGS, inversions=cache)[0]
    assert inverted_rows_seen == [1, 1, 1]  # the masked edit inverted again, recording its trajectory
    assert _levels(fresh, reused) == 0
    edit_batch(model, [masked, plain], settings=SETTINGS, inversions=cache)  # both served by the recorded one
    assert inverted_rows_seen == [1, 1, 1]


def test_the_cache_keeps_the_most_recently_used_within_its_bytes():
    def entry(value: float) -> Inverted:
        return Inverted(torch.full((1, 4, 8, 8), value), None)  # 1,024 bytes

    cache = InversionCache(limit=3 * 1024)
    keys = [(str(n), (1, 3, 64, 64), "a cat", 0, "icd", 50) for n in range(4)]
    for key in keys[:3]:
        cache.put(key, entry(1.0))
    assert cache.get(keys[0], trajectory=False) is not None  # used: the second is now the oldest
    cache.put(keys[3], entry(2.0))
    assert cache.get(keys[1], trajectory=False) is None
    assert all(cache.get(key, trajectory=False) is not None for key in (keys[0], keys[2], keys[3]))
    assert cache.nbytes == 3 * 1024
    cache.put(keys[0], Inverted(torch.zeros(1, 4, 64, 64), None))  # larger than the whole cache: not kept
    assert cache.get(keys[0], trajectory=False) is not None and cache.nbytes == 3 * 1024


def test_the_pipeline_reuses_an_inversion_across_its_calls(inverted_rows_seen):
    from icdcli import ICDEditPipeline

    pipe = ICDEditPipeline.from_pretrained(device="cpu", backend="torch")
    (image, source, target), (_, _, other) = _scenes(2)
    first = pipe(image, source, target, seed=3).images[0]
    second = pipe(image, source, other, seed=3).images[0]
    assert inverted_rows_seen == [1]
    assert model_inversions(pipe.model).hits == 1
    assert _levels(first, second) > ROUNDING_LEVELS
    pipe(image, source, target, seed=4)
    assert inverted_rows_seen == [1, 1]
    several = pipe([image] * 3, source, [target, other, target], seed=5).images
    assert inverted_rows_seen == [1, 1, 1]  # one call, three edits of one photo: one inversion
    assert _levels(several[0], several[2]) == 0 and _levels(several[0], several[1]) > ROUNDING_LEVELS


# --- several --tgt, and --jobs: the command line's edits of one photo --------------------------------------------

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SOURCE = "a red circle on a blue background"
TARGETS = ["a yellow circle on a blue background", "a green circle on a blue background",
           "a red square on a blue background"]  # fmt: skip


def _icd(*args: object, stdin: str | None = None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=stdin)


def _targets(*targets: str) -> list[str]:
    return [arg for target in targets for arg in ("--tgt", target)]


def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_several_targets_edit_a_photo_once_each_from_one_inversion(tmp_path, inverted_rows_seen):
    photo = tmp_path / "photo.png"
    shutil.copy(EXAMPLE, photo)
    result = _icd("edit", photo, "--src", SOURCE, *_targets(*TARGETS), "--json")
    assert result.exit_code == 0, result.output
    assert inverted_rows_seen == [1]  # the first edit runs alone, the other two take its inversion from the cache
    done = [line for line in _json_lines(result.output) if line["status"] == "done"]
    assert [Path(line["output"]).name for line in done] == [f"photo-edit-{n}.png" for n in (1, 2, 3)]
    assert [line["tgt"] for line in done] == TARGETS
    for number, target in enumerate(TARGETS, start=1):
        assert read_record(tmp_path / f"photo-edit-{number}.png")["tgt"] == target
    # each output is the edit one --tgt makes
    single = _icd("edit", photo, "--src", SOURCE, "--tgt", TARGETS[1], "-o", tmp_path / "single.png")
    assert single.exit_code == 0, single.output
    assert _levels(Image.open(tmp_path / "single.png"), Image.open(tmp_path / "photo-edit-2.png")) <= ROUNDING_LEVELS
    # a rerun finds them all made; a repeated target is made once
    again = _icd("edit", photo, "--src", SOURCE, *_targets(*TARGETS, TARGETS[0]), "--json")
    assert again.exit_code == 0, again.output
    assert [line["status"] for line in _json_lines(again.output)] == ["skipped"] * 3 + ["summary"]
    assert "is the same edit as" in again.output


def test_several_targets_of_several_photos_go_to_a_folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(EXAMPLE, photos / name)
    result = _icd("edit", photos, "--src", SOURCE, *_targets(*TARGETS[:2]), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "a-edit-1.png", "a-edit-2.png", "b-edit-1.png", "b-edit-2.png"
    ]  # fmt: skip
    assert read_record(tmp_path / "out" / "b-edit-2.png")["tgt"] == TARGETS[1]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["-o", "edited.png"], "-o edited.png names one file"),
        (["--spec", "rows.jsonl"], "not with --spec"),
        (["-o", "-"], "not with -o -"),
        (["--from", "photo-edit.png"], "not with --from"),
    ],
)
def test_several_targets_refuse_what_makes_one_edit(tmp_path, extra, says):
    result = _icd("edit", EXAMPLE, "--src", SOURCE, *_targets(*TARGETS[:2]), *extra)
    assert result.exit_code == 2 and says in result.output, result.output
    assert "Traceback" not in result.output


def test_an_unreadable_photo_with_several_targets_is_said_once_and_counted_per_edit(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    result = _icd("edit", tmp_path, "--src", SOURCE, *_targets(*TARGETS), "--json")
    assert result.exit_code == 1, result.output
    assert result.stderr.count("empty.png: not an image file") == 1, result.stderr
    assert [line["status"] for line in _json_lines(result.stdout)] == ["failed"] * 3 + ["summary"]  # one per edit
    assert "Error: 3 of 3 edits failed" in result.stderr


def test_several_targets_take_a_folder_named_like_a_file_when_it_ends_in_a_separator(tmp_path):
    result = _icd("edit", EXAMPLE, "--src", SOURCE, *_targets(*TARGETS[:2]), "-o", f"{tmp_path / 'edited.png'}/")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "edited.png").iterdir()) == ["red-circle-edit-1.png",
                                                                                 "red-circle-edit-2.png"]  # fmt: skip


def test_a_scripts_edits_of_one_photo_through_jobs_invert_it_once(tmp_path, inverted_rows_seen):
    lines = [{"image": str(EXAMPLE), "src": SOURCE, "tgt": target, "output": str(tmp_path / f"{n}.png")}
             for n, target in enumerate(TARGETS)]  # fmt: skip
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    result = _icd("edit", "--jobs", "-", "--any-output", stdin=stdin)
    assert result.exit_code == 0, result.output
    assert [line["status"] for line in _json_lines(result.output)][:3] == ["done"] * 3
    assert sum(inverted_rows_seen) == 1


def test_several_targets_decode_one_saved_inversion(tmp_path):
    photo = tmp_path / "photo.png"
    shutil.copy(EXAMPLE, photo)
    assert _icd("invert", photo, "--prompt", SOURCE).exit_code == 0
    latents = tmp_path / "photo.latent.safetensors"
    result = _icd("edit", "--latents", latents, *_targets(*TARGETS[:2]), "--json")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.output)
    assert [(Path(line["output"]).name, line["tgt"]) for line in lines] == [
        ("photo-edit-1.png", TARGETS[0]), ("photo-edit-2.png", TARGETS[1])
    ]  # fmt: skip
    one = _icd("edit", "--latents", latents, "--tgt", TARGETS[1], "-o", tmp_path / "one.png")
    assert one.exit_code == 0, one.output
    assert _levels(Image.open(tmp_path / "one.png"), Image.open(tmp_path / "photo-edit-2.png")) == 0
    refused = _icd("edit", "--latents", latents, *_targets(*TARGETS[:2]), "-o", tmp_path / "x.png")
    assert refused.exit_code == 2 and "give -o a folder" in refused.output
    into = _icd("edit", "--latents", latents, *_targets(*TARGETS[:2]), "-o", tmp_path / "edited")
    assert into.exit_code == 0, into.output
    assert sorted(path.name for path in (tmp_path / "edited").iterdir()) == ["photo-edit-1.png", "photo-edit-2.png"]


def test_a_recorded_edit_repeated_with_another_target(tmp_path):
    photo = tmp_path / "photo.png"
    shutil.copy(EXAMPLE, photo)
    assert _icd("edit", photo, "--src", SOURCE, "--tgt", TARGETS[0]).exit_code == 0
    again = _icd("edit", "--from", tmp_path / "photo-edit.png", "--tgt", TARGETS[2], "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert read_record(tmp_path / "again.png")["tgt"] == TARGETS[2]
    same = _icd("edit", "--from", tmp_path / "photo-edit.png", "-o", tmp_path / "same.png")
    assert same.exit_code == 0 and read_record(tmp_path / "same.png")["tgt"] == TARGETS[0]


def test_the_throughput_benchmark_times_every_run_with_its_own_inversions(tmp_path, inverted_rows_seen):
    from icdcli.bench.throughput import timed_run, write_spec

    loaded = load_model(MODEL_OPTIONS, need_teacher=False, backend="torch")
    spec = write_spec(tmp_path, 3)
    for turn in range(2):
        row = timed_run(loaded, spec, tmp_path / f"out-{turn}", batch_size=3)
        assert row["images"] == 3
    assert sum(inverted_rows_seen) == 6  # the second run did not take the first run's inversions
