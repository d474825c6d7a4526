"""`icd bench throughput`: images per second of `icd edit` over a spec of edits, batch 1 against a larger batch
(the measurement: `icdcli.bench.throughput`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click

from icdcli.bench.throughput import (
    SD15_BATCH,
    SD15_IMAGES,
    SHAPES_IMAGES,
    measure_throughput,
    sd15_model_options,
    write_photo_spec,
    write_spec,
)
from icdcli.cli.bench_scale import width_scale_option
from icdcli.cli.common import load_model, reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import BACKEND_CHOICES, model_options


@click.command("throughput")
@click.option(
    "--images",
    type=click.IntRange(min=1),
    default=None,
    help=f"Edits in the spec. Default: {SHAPES_IMAGES} (shapes32), {SD15_IMAGES} (sd15).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help=f"The batch size compared with batch 1. Default: icd edit's for this device (shapes32), {SD15_BATCH} (sd15).",
)
@click.option(
    "--arch",
    type=click.Choice(["shapes32", "sd15"]),
    default="shapes32",
    show_default=True,
    help="shapes32: the embedded model on 32 px scenes. sd15: SD1.5-architecture models (random weights, the "
    "release's formats, as icd bench scale writes them) on 512 px photos, Prompt-to-Prompt.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    envvar="ICD_BACKEND",
    help="Where the networks run (as icd edit --backend).",
)
@click.option(
    "--size",
    type=click.IntRange(min=64),
    default=None,
    help="sd15: the photos' side in pixels, a multiple of 64. Default: 512.",
)
@click.option(
    "--repeats",
    "repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Run each batch size N times, taking turns, and report the median (each row's `runs` lists them all): "
    "steadier figures on a shared or busy machine.",
)
@width_scale_option
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"arch", "load_seconds", "rows": '
              '[{"batch_size", "images_per_second", ...}]}.')  # fmt: skip
@model_options
@console_options
@reports_errors
def throughput(images: int | None, batch_size: int | None, arch: str, backend: str, size: int | None, repeat: int,
               width: float, as_json: bool, **model_opts: Any) -> None:  # fmt: skip
    """Images per second of icd edit over a spec of edits: batch 1 against the default (or --batch-size).

    Each row edits the same --images inputs (the model's recipe) into a fresh folder, reading and writing files
    as icd edit does; the model loads once before the rows (load_seconds, which includes fusing and exporting on
    first use). Time on an idle machine: other processes on the CPUs lower every row.
    """
    spec_writer: Callable[[Path, int], Path] = write_spec
    extra: dict[str, Any] = {}
    if arch == "sd15":
        if size is not None and size % 64:
            raise click.ClickException(f"--size {size}: SD1.5 works on sides that are multiples of 64, e.g. 512")
        side = size or 512
        model_opts = sd15_model_options(model_opts, width, say)
        extra = {"width_scale": width, "files_seconds": model_opts.pop("files_seconds")}
        model_opts["native_size"] = side
        images, batch_size = images or SD15_IMAGES, batch_size or SD15_BATCH
        spec_writer = partial(write_photo_spec, size=side)
    elif size is not None or width != 1.0:
        raise click.ClickException("--size and --width-scale are for --arch sd15; shapes32 runs at its 32 px")
    images = images or SHAPES_IMAGES
    loaded = load_model(model_opts, need_teacher=False, backend=backend)
    # a 512 px edit takes a minute or more on a CPU: one warm-up edit opens the sessions all the same
    warm_up = 1 if arch == "sd15" else 2
    result = measure_throughput(
        loaded, images, [1, batch_size], say, spec_writer=spec_writer, warm_up=warm_up, repeat=repeat
    )
    result = {"arch": arch, **result, **extra}
    if as_json:
        console().json(result)
        return
    from icdcli.bench.scenes import markdown_table

    console().report(f"{arch} at {result['size']} px on {result['backend']}; {images} images; model loaded in "
               f"{result['load_seconds']:.2f} s")  # fmt: skip
    console().report(markdown_table(result["rows"], ["batch_size", "images", "seconds", "images_per_second"]))
    if repeat > 1:
        console().report(f"(the median of {repeat} runs each; seconds: the median run's)")
    first, last = result["rows"][0], result["rows"][-1]
    if first["images_per_second"] > 0:
        console().report(f"speed-up: {last['images_per_second'] / first['images_per_second']:.2f}x")
