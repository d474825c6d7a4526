"""`icd bench scale`: SD1.5- and SDXL-sized models (random weights, the release's formats) end to end."""

from __future__ import annotations

import click

from icdcli.cli.common import reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import FiniteFloatRange

width_scale_option = click.option(
    "--width-scale",
    "width",
    type=FiniteFloatRange(min=0.01, max=1.0),
    default=1.0,
    hidden=True,
    help="Shrink every channel count of the real-scale models (same blocks and key names): for tests.",
)


def _check_backends(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """The `--backends` entries, each checked (`name` or `name:precision`): a usage error names the choices. (A row
    listed twice depends on --precision: `bench_scale` refuses it.)"""
    from icdcli.bench.scale_rows import ROW_BACKENDS, parse_row
    from icdcli.core.errors import ICDError

    entries = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    if not entries:
        raise click.BadParameter(f"name one or more of {', '.join(ROW_BACKENDS)}")
    try:
        for entry in entries:
            parse_row(entry, "fp32")
    except ICDError as error:
        raise click.BadParameter(str(error)) from error
    return entries


@click.command("scale")
@click.option(
    "--arch",
    type=click.Choice(["sd15", "sdxl"]),
    default="sd15",
    show_default=True,
    help="Architecture: SD1.5 (860M UNet, CLIP-L) or SDXL (2.6B UNet, CLIP-L + OpenCLIP-bigG).",
)
@click.option(
    "--size",
    type=click.IntRange(min=64),
    default=None,
    help="Image side in pixels. Default: the architecture's (512 or 1024).",
)
@click.option(
    "--backends",
    default="torch,onnxruntime",
    show_default=True,
    callback=_check_backends,
    metavar="NAME[:PRECISION],...",
    help="Comma-separated rows, each a backend (torch, onnxruntime, openvino, tensorrt) at --precision, or at its own "
    "with NAME:PRECISION (fp32, fp16, bf16, int8), e.g. openvino:bf16. Each row's parity is against the first fp32 "
    "row (else the first). int8: OpenVINO compresses the UNets' weights with NNCF (pip install "
    '"icd[openvino-int8]"), computing at bf16 where the CPU has it; ONNX Runtime runs its dynamic quantization of the '
    "UNet graphs (a sibling folder of the export). OpenVINO and int8 rows run the fp32 export on the CPU.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
    default="fp32",
    show_default=True,
    help="Precision of the rows --backends names without one: the UNets and text encoder (the VAE stays fp32). "
    "PyTorch and TensorRT fp16/bf16 rows keep the fused cache in fp16 too; int8: see --backends.",
)
@click.option(
    "--method",
    type=click.Choice(["swap", "p2p"]),
    default=None,
    help="Edit by prompt swap or Prompt-to-Prompt. Default: the release's (p2p for SD1.5, swap for SDXL).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Timed edits per row, after one warm-up.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--low-memory/--no-low-memory",
    "low_memory",
    default=None,
    help="Free each UNet after its stage of the edit, as icd edit does. Default: icd edit's rule (by size).",
)
@width_scale_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object: {"arch", "size", "rows": [{"backend", "precision", "row", "seconds", '
    '"peak_rss_gb", "parity": {"reference", "latents_max", "pixels_max", "pixels_mean", "within_bound"}}], '
    '"parity": {"reference", "latents", "pixels"}, "skipped", "failures", ...}.',
)
@console_options
@reports_errors
def scale(arch: str, size: int | None, backends: tuple[str, ...], precision: str, method: str | None, repeats: int,
          device: str, seed: int, low_memory: bool | None, width: float, as_json: bool) -> None:  # fmt: skip
    """Run the real architectures end to end: seconds, peak memory, disk and backend parity per stage.

    Writes once into icd's cache (and reuses) a base pipeline folder, a teacher .pt and two LoRA files with the
    real SD1.5 or SDXL architectures, the release's key names, time_cond_proj_dim, rank 64 / alpha 8 and file
    names - random seeded weights, since the cost of a network does not depend on its weights' values - then runs
    them through the path --base/--teacher/--forward-lora/--reverse-lora take: fuse (cached), export (ONNX
    Runtime), one warm-up and --repeats timed edits per row, each stage in a process of its own so its peak
    memory is its own. Needs tens of GB of disk at full size (SD1.5 ~30, SDXL ~60).

    A row is a backend at a precision, and one run sets several side by side, e.g. the CPU engines of issue #30:

    \b
      --backends onnxruntime:fp32,openvino:fp32,openvino:bf16,openvino:int8,torch:bf16,onnxruntime:int8

    Each row reports seconds, peak memory and its parity with the reference (the first fp32 row): the largest latent
    difference, and the largest and mean pixel difference on 0-255 (within bound when the mean is at most 3).
    """
    from icdcli.bench.scale import ScaleOptions, bench_scale, markdown_report

    options = ScaleOptions(
        arch=arch, size=size, backends=backends,
        precision=precision, method=method, repeats=repeats, device=device, width=width, seed=seed,
        low_memory=low_memory, verbosity=console().verbosity.name.lower(),
    )  # fmt: skip
    report = bench_scale(options, progress=say)
    if as_json:
        console().json(report)
    else:
        console().report(markdown_report(report))
