"""`icd bench`: the group, and its benchmarks on the embedded model's held-out scenes (inversion, shapes-edit,
latency); pie, throughput, scale and gpu live in modules of their own and are added to the group here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from icdcli.cli.bench_gpu import gpu
from icdcli.cli.bench_pie import pie
from icdcli.cli.bench_scale import scale
from icdcli.cli.bench_throughput import throughput
from icdcli.cli.common import load_model, need_scikit_image, reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import NumberType, model_options


@click.group()
@console_options
def bench() -> None:
    """Measure the model on held-out procedural scenes (the embedded model's world)."""


def bench_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="Held-out scenes."),
        click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True, help="Images per batch."),
        click.option(
            "--seed", type=NumberType("seed"), default=0, show_default=True, help="Seed of the scenes and the noise."
        ),
        click.option("--json", "as_json", is_flag=True, help='Print one JSON object: {"n_images": N, "rows": [...]}.'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@bench.command("inversion")
@click.option(
    "--variants",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of model variants named like the rows (cd2, cd3, cd4, cd4+lf); --model is cd4+lf+lr.",
)
@click.option(
    "--lpips",
    "lpips_path",
    type=click.Path(path_type=Path),
    default=None,
    help="LPIPS-squeeze weights (a local state dict of lpips.LPIPS(net='squeeze')): adds an lpips column.",
)
@bench_options
@model_options
@console_options
@reports_errors
def bench_inversion_command(
    variants: Path | None, lpips_path: Path | None, limit: int, batch: int, seed: int, as_json: bool,
    **model_opts: Any,
) -> None:  # fmt: skip
    """Reconstruction quality (MSE, PSNR, SSIM) in the shape of the paper's Table 2.

    Unguided decoding: fDDIM50|DDIM50 on the teacher, fCD|CD with 2, 3 and 4 steps, +L_f, +L_f+L_r.
    Guided decoding at w=8: DDIM50 without and with dynamic guidance, fCD4|CD4 likewise, +L_f,
    +L_f+L_r. Rows whose model variant is absent are listed as skipped.
    """
    need_scikit_image()
    from icdcli.bench.inversion import bench_inversion, load_variants
    from icdcli.bench.scenes import markdown_table
    from icdcli.models.fusion import load_model_folder

    model = load_model(model_opts, need_teacher=True).model
    found = load_variants(variants, lambda path: load_model_folder(path).to(model.device, model.dtype))
    found.setdefault("cd4+lf+lr", model)
    lpips = None
    if lpips_path is not None:
        from icdcli.pie.networks import load_lpips

        lpips = load_lpips(lpips_path)
    teacher = model if model.teacher_unet is not None else None
    result = bench_inversion(found, teacher, count=limit, batch=batch, seed=seed, progress=say, lpips=lpips)
    if as_json:
        console().json(result)
        return
    console().report(markdown_table(result["rows"], ["config", "mse", "psnr", "ssim"] + (["lpips"] if lpips else [])))
    if result["skipped"]:
        console().report(f"\nskipped (no such variant): {', '.join(result['skipped'])}")


@bench.command("shapes-edit")
@click.option(
    "--method",
    type=click.Choice(["all", "swap", "p2p"]),
    default="all",
    show_default=True,
    help="Editing methods to compare: prompt swap, Prompt-to-Prompt, or both.",
)
@bench_options
@model_options
@console_options
@reports_errors
def bench_shapes_edit_command(method: str, limit: int, batch: int, seed: int, as_json: bool, **model_opts: Any) -> None:
    """Edit held-out scenes to a copy with one attribute changed and compare with its exact rendering.

    For each kind (colour, shape, background): PSNR to the target, PSNR of the unchanged region to
    the source, and attribute accuracy. Methods: icd4-swap and icd4-p2p (the model: prompt swap and
    Prompt-to-Prompt with the model's edit recipe), ddim50-swap and ddim50-p2p (its teacher: DDIM50
    inversion, then 50 steps at w=8), icd4-p2p-blend (icd4-p2p with local blend on the edited word),
    icd4-p2p-blend-inversion (the same, keeping the inversion's latents outside the word's region), icd4-swap-mask
    and icd4-p2p-mask (held to the changed pixels grown by 2 px, as --mask holds an edit). With
    --method all, two references: vae (the source through the VAE alone: the unchanged region's ceiling) and
    latent-blend-oracle (the source's latents where the edit changes no pixel of a latent cell, the exact
    target's elsewhere: the best any blend of latents can do). Then, per kind of caption word (the shape's colour,
    the shape, the background's colour), how well its cross-attention map, as local blend thresholds it, covers
    its region (IoU).
    """
    from icdcli.bench.scenes import markdown_table
    from icdcli.bench.shapes_edit import EDIT_METHODS, bench_shapes_edit

    model = load_model(model_opts, need_teacher=True).model
    methods = tuple(m for m in EDIT_METHODS if method in ("all", m.editing))
    result = bench_shapes_edit(model, count=limit, batch=batch, seed=seed, methods=methods, progress=say)
    if as_json:
        console().json(result)
        return
    console().report(markdown_table(result["rows"], ["method", "kind", "psnr_target", "psnr_background", "accuracy"]))
    console().report("\n" + markdown_table(result["localisation"], ["word_kind", "iou", "localised", "region"]))


@bench.command("latency")
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="Timed edits per row.")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Image side in pixels. Default: the model's.")
@click.option(
    "--backends", default="torch,onnxruntime,tensorrt", show_default=True, help="Comma-separated backends to time."
)
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object: {"device", "rows", "speedup"}.')
@model_options
@console_options
@reports_errors
def bench_latency_command(limit: int, size: int | None, backends: str, as_json: bool, **model_opts: Any) -> None:
    """Seconds per edit on each backend: iCD by prompt swap and by Prompt-to-Prompt, and the 50-step baseline
    (DDIM inversion + 50 guided steps) with the teacher as it is and under real classifier-free guidance.

    Each row is the median of --limit whole edits after a warm-up, the rows timed in interleaved rounds
    (so drift of the machine shifts every row alike); exports and engine builds happen before timing.
    Backends that cannot run here are skipped with the reason. Time on an idle machine.
    """
    from icdcli.bench.latency import measure_latency

    model = load_model(model_opts, need_teacher=True).model
    result = measure_latency(
        model, [b.strip() for b in backends.split(",") if b.strip()], repeats=limit, size=size, progress=say
    )
    if as_json:
        console().json(result)
        return
    from icdcli.bench.scenes import markdown_table

    console().report(f"device: {result['device']}; model {result['model']}; image {result['image']}")
    console().report(markdown_table(result["rows"], ["backend", "method", "seconds_per_edit"]))
    for name, value in {**result["speedup"], **result["overhead"]}.items():
        console().report(f"{name}: {value:.2f}x")
    for name, reason in result["skipped"].items():
        console().report(f"skipped {name}: {reason}")


bench.add_command(pie)
bench.add_command(throughput)
bench.add_command(scale)
bench.add_command(gpu)
