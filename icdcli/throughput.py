"""`icd bench throughput`: images per second of `icd edit` over a spec of held-out scenes, batch 1 against a
larger batch in the same run, and the model's load time.

The spec (written to a temporary folder) holds one edit per held-out scene of the embedded model's world:
its caption to the caption of a copy with one attribute changed, as `icd bench shapes-edit` builds them.
Each row is a whole `icd edit --spec` run in this process (reading, editing, writing, records), timed
from the first item to the last, with the model loaded once before all rows. `--arch sd15` (real-scale
models at 512 px) is not measured here: it needs those models, so the option is refused with a note.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import load_model, model_options, reports_errors, say
from .values import strict_json


def write_spec(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` held-out scenes as PNGs and a spec editing each to its one-attribute-changed copy."""
    from PIL import Image

    from .bench.scenes import edit_pairs

    rows = []
    for index, (source, target, _) in enumerate(edit_pairs(count, seed)[:count]):
        name = f"scene{index:04d}.png"
        Image.fromarray(source.render(32)).save(folder / name)
        rows.append({"image": name, "src": source.caption(), "tgt": target.caption(), "seed": index})
    spec = folder / "spec.jsonl"
    spec.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return spec


def timed_run(loaded: Any, spec: Path, out: Path, batch_size: int | None) -> dict[str, Any]:
    """One `icd edit --spec SPEC -o OUT` run on the loaded model: its batch size, images/s and counts."""
    from .batch import default_batch_size, read_spec
    from .edit_run import EditFlags, EditRun
    from .planning import plan_items

    items = plan_items(read_spec(spec), out, spec.parent)
    flags = EditFlags(None, None)  # the model's recipe
    runner = EditRun(flags, {}, as_json=False, batch=True, overwrite=False, started=0.0, batch_size=batch_size)
    runner.adopt(loaded)
    runner.quiet = True
    started = time.perf_counter()
    runner.started = runner.mark = started
    runner.pipeline().run(items)
    seconds = time.perf_counter() - started
    size = batch_size or default_batch_size(loaded.model.device.type, 32 * 32)
    tally = runner.tally
    return {
        "batch_size": size,
        "images": tally.done,
        "failed": tally.failed,
        "seconds": round(seconds, 3),
        "images_per_second": round(tally.done / seconds, 3) if seconds > 0 else 0.0,
    }


def measure_throughput(
    loaded: Any, images: int, batch_sizes: list[int | None], progress: Callable[[str], None]
) -> dict[str, Any]:
    """Rows of `timed_run` over one spec of `images` scenes, each into a fresh output folder (after a warm-up)."""
    with tempfile.TemporaryDirectory(prefix="icd-throughput-") as temporary:
        folder = Path(temporary)
        spec = write_spec(folder, images)
        warm = folder / "warm-up"
        warm_spec = write_spec(_fresh(folder / "warm-spec"), 2)
        timed_run(loaded, warm_spec, _fresh(warm), 2)
        rows = []
        for index, size in enumerate(batch_sizes):
            progress(f"throughput: batch size {size or 'default'}")
            rows.append(timed_run(loaded, spec, _fresh(folder / f"out-{index}"), size))
    return {"images": images, "backend": loaded.backend, "load_seconds": round(loaded.seconds, 3), "rows": rows}


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder


@click.command("throughput")
@click.option("--images", type=click.IntRange(min=1), default=100, show_default=True, help="Edits in the spec.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="The batch size compared with batch 1. Default: icd edit's for this device.",
)
@click.option(
    "--arch",
    type=click.Choice(["shapes32", "sd15"]),
    default="shapes32",
    show_default=True,
    help="shapes32: the embedded model. sd15: real-scale models at 512 px (not available in this build).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]),
    default="auto",
    show_default=True,
    envvar="ICD_BACKEND",
    help="Where the networks run (as icd edit --backend).",
)
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"load_seconds", "rows": [{"batch_size", '
              '"images_per_second", ...}]}.')  # fmt: skip
@model_options
@reports_errors
def throughput(images: int, batch_size: int | None, arch: str, backend: str, as_json: bool, **model_opts: Any) -> None:
    """Images per second of icd edit over held-out scenes: batch 1 against the default (or --batch-size).

    Each row edits the same --images scenes (a spec of one-attribute edits, the model's recipe) into a
    fresh folder, reading and writing files as icd edit does; the model loads once before the rows
    (load_seconds). Time on an idle machine: other processes on the CPUs lower every row.
    """
    if arch == "sd15":
        raise click.ClickException(
            "--arch sd15 needs the real-scale SD1.5 models, which this build does not provide: measure "
            "`icd edit --spec` on them directly, with --batch-size 1 and 4"
        )
    loaded = load_model(model_opts, need_teacher=False, backend=backend)
    result = measure_throughput(loaded, images, [1, batch_size], say)
    if as_json:
        click.echo(strict_json(result))
        return
    from .bench.scenes import markdown_table

    click.echo(f"backend {result['backend']}; {images} images; model loaded in {result['load_seconds']:.2f} s")
    click.echo(markdown_table(result["rows"], ["batch_size", "images", "seconds", "images_per_second"]))
    first, last = result["rows"][0], result["rows"][-1]
    if first["images_per_second"] > 0:
        click.echo(f"speed-up: {last['images_per_second'] / first['images_per_second']:.2f}x")
