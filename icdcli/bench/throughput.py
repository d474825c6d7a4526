"""`icd bench throughput` (its command: `icdcli.cli.bench_throughput`): images per second of `icd edit` over a spec
of held-out scenes, batch 1 against a larger batch in the same run, and the model's load time.

The spec (written to a temporary folder) holds one edit per held-out scene of the embedded model's world:
its caption to the caption of a copy with one attribute changed, as `icd bench shapes-edit` builds them.
Each row is a whole `icd edit --spec` run in this process (reading, editing, writing, records), timed
from the first item to the last, with the model loaded once before all rows.

`--arch sd15` measures the same at real scale: the SD1.5-architecture files of `icd bench scale` (random weights
in the release's formats, written once into the cache) loaded as a user's `--base/--teacher/--forward-lora/
--reverse-lora` are, and a spec of 512 px photos with their own prompts and seeds, batch 1 against batch 4.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError


def write_spec(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` held-out scenes as PNGs and a spec editing each to its one-attribute-changed copy."""
    from PIL import Image

    from icdcli.bench.scenes import edit_pairs

    rows = []
    for index, (source, target, _) in enumerate(edit_pairs(count, seed)[:count]):
        name = f"scene{index:04d}.png"
        Image.fromarray(source.render(32)).save(folder / name)
        rows.append({"image": name, "src": source.caption(), "tgt": target.caption(), "seed": index})
    spec = folder / "spec.jsonl"
    spec.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return spec


SD15_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (30, 60, 200)}
SD15_ANIMALS = ("cat", "dog")
SD15_BATCH = 4
SD15_IMAGES = 4
SHAPES_IMAGES = 100
_OWN_MODEL = ("model", "base", "base_config", "teacher", "forward_lora", "reverse_lora")


def sd15_edits() -> list[tuple[str, str, str, str]]:
    """Distinct (animal, its colour, background colour, target colour) edits in the scale tokenizer's words."""
    colours = list(SD15_COLOURS)
    return [
        (animal, colour, background, target)
        for animal, colour, background, target in itertools.product(SD15_ANIMALS, colours, colours, colours)
        if len({colour, background}) == 2 and target != colour
    ]


def write_photo_spec(folder: Path, count: int, size: int) -> Path:
    """`count` photos of `size` px (a coloured square on another colour) and a spec editing each square's colour,
    each with its own prompts (repeating after 24) and seed: Prompt-to-Prompt word-for-word edits."""
    import numpy as np
    from PIL import Image

    edits = sd15_edits()
    rows = []
    for index in range(count):
        animal, colour, background, target = edits[index % len(edits)]
        pixels = np.full((size, size, 3), SD15_COLOURS[background], dtype=np.uint8)
        start = size // 4 + (index * size // 16) % (size // 4)  # the square moves a little from photo to photo
        pixels[start : start + size // 2, size // 4 : 3 * size // 4] = SD15_COLOURS[colour]
        name = f"photo{index:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        prompt = "a photo of a {} " + animal + " sitting on a " + background + " background"
        rows.append({"image": name, "src": prompt.format(colour), "tgt": prompt.format(target), "seed": index})
    spec = folder / "spec.jsonl"
    spec.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return spec


def timed_run(loaded: Any, spec: Path, out: Path, batch_size: int | None) -> dict[str, Any]:
    """One `icd edit --spec SPEC -o OUT` run on the loaded model: its batch size, images/s and counts."""
    from icdcli.editing.reuse import model_inversions
    from icdcli.run.batch import default_batch_size, read_spec
    from icdcli.run.inputs import EditFlags
    from icdcli.run.planning import plan_items
    from icdcli.run.runner import EditRun

    items = plan_items(read_spec(spec), out, spec_out=spec.parent)
    flags = EditFlags(None, None)  # the model's recipe
    runner = EditRun(flags, None, batch=True, overwrite=False, batch_size=batch_size)
    runner.adopt(loaded)
    runner.report.quiet = True
    model_inversions(loaded.model).clear()  # each run inverts its photos itself, as a fresh `icd edit` does
    started = time.perf_counter()
    runner.started = runner.steps.mark = started
    runner.pipeline().run(items)
    seconds = time.perf_counter() - started
    size = batch_size or default_batch_size(loaded.model.device.type, loaded.model.info.native_size**2)
    tally = runner.report.tally
    return {
        "batch_size": size,
        "images": tally.done,
        "failed": tally.failed,
        "seconds": round(seconds, 3),
        "images_per_second": float(f"{tally.done / seconds:.4g}") if seconds > 0 else 0.0,  # 4 digits: 512 px is ~0.005
    }


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several timed runs of a batch size: the median run (the upper one of an even count), its rate the
    median rate, and `runs` every run's images/s in the order they ran."""
    rates = [run["images_per_second"] for run in runs]
    row = dict(sorted(runs, key=lambda run: run["images_per_second"])[len(runs) // 2])
    if len(runs) > 1:
        row["images_per_second"] = float(f"{statistics.median(rates):.4g}")
        row["runs"] = rates
    return row


def measure_throughput(
    loaded: Any,
    images: int,
    batch_sizes: list[int | None],
    progress: Callable[[str], None],
    *,
    spec_writer: Callable[[Path, int], Path] = write_spec,
    warm_up: int = 2,
    repeat: int = 1,
) -> dict[str, Any]:
    """Rows of `timed_run` over one spec of `images` edits, each into a fresh output folder, after a warm-up run.

    Args:
        spec_writer: writes `count` inputs and their spec into a folder (`write_spec`: the held-out scenes).
        warm_up: edits of the warm-up run (as one batch): opens every session and allocates before the rows.
        repeat: runs of each batch size, taking turns (1, N, 1, N, ...), so that a slow spell of a shared machine
            falls on both; each row is their `median_row`.
    """
    with tempfile.TemporaryDirectory(prefix="icd-throughput-") as temporary:
        folder = Path(temporary)
        spec = spec_writer(folder, images)
        warm = folder / "warm-up"
        warm_spec = spec_writer(_fresh(folder / "warm-spec"), warm_up)
        progress(f"throughput: warm-up ({warm_up} edit{'s' if warm_up > 1 else ''})")
        timed_run(loaded, warm_spec, _fresh(warm), warm_up)
        runs: list[list[dict[str, Any]]] = [[] for _ in batch_sizes]
        for turn in range(repeat):
            for index, size in enumerate(batch_sizes):
                of = f" (run {turn + 1} of {repeat})" if repeat > 1 else ""
                progress(f"throughput: batch size {size or 'default'}{of}")
                runs[index].append(timed_run(loaded, spec, _fresh(folder / f"out-{index}-{turn}"), size))
        rows = [median_row(each) for each in runs]
    size = loaded.model.info.native_size
    return {"images": images, "size": size, "backend": loaded.backend, "load_seconds": round(loaded.seconds, 3),
            "rows": rows}  # fmt: skip


def sd15_model_options(model_opts: dict[str, Any], width: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """The model options of `--arch sd15`: the scale files (written first when missing) as --base, --teacher,
    --forward-lora and --reverse-lora; the files' seconds to write (None: they were there)."""
    from icdcli.bench.scale_models import scale_files

    given = [name for name in _OWN_MODEL if model_opts.get(name)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ICDError(f"--arch sd15 brings its own models: leave out {flag} (or use --arch shapes32)")
    files, written = scale_files("sd15", width, progress=progress)
    paths = {"base": files.base, "teacher": files.teacher, "forward_lora": files.forward_lora,
             "reverse_lora": files.reverse_lora}  # fmt: skip
    return {**model_opts, **{name: str(path) for name, path in paths.items()}, "files_seconds": written}


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder
