"""`icd bench gpu`: the PyTorch CUDA path at SD1.5/SDXL size (random weights built on the device), in minutes."""

from __future__ import annotations

from pathlib import Path

import click

from icdcli.cli.common import reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import FiniteFloatRange


@click.command("gpu")
@click.option(
    "--arch",
    "archs",
    type=click.Choice(["sd15", "sdxl"]),
    multiple=True,
    help="Architecture(s), in the order given; repeat for both. Default: sd15.",
)
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N, or cpu (a reduced-width check).")
@click.option(
    "--width-scale",
    "width",
    type=FiniteFloatRange(min=0.01, max=1.0),
    default=1.0,
    show_default=True,
    help="Shrink every channel count of the models (same blocks): below 1 for CPU checks and tests.",
)
@click.option(
    "--size",
    type=click.IntRange(min=64),
    default=None,
    help="Image side in pixels, a multiple of 64 (SD1.5) or 32 (SDXL). Default: the architecture's (512 or 1024).",
)
@click.option(
    "--mode",
    "modes",
    type=click.Choice(["eager", "graphs", "compile"]),
    multiple=True,
    help="Execution modes to time, in the order given. Default: eager, graphs, compile.",
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed edits per row.")
@click.option(
    "--eval-repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed evaluations per row."
)
@click.option(
    "--time-limit",
    type=FiniteFloatRange(min=0),
    default=420.0,
    show_default=True,
    help="Seconds for the whole run: steps that would not fit are skipped (with the reason), one that runs past "
    "it is stopped.",
)
@click.option("--parity/--no-parity", default=True, show_default=True, help="Compare fp16 CUDA with fp32 CPU.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON report here after every step (atomically), so a killed run keeps what it measured.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object: {"device", "versions", "backends", "builds", "rows": [{"arch", "mode", "method", '
    '"batch", "status", "reason", "seconds", "peak_memory_gb", ...}], "parity": {"eval", "edit_pixels"}}.',
)
@console_options
@reports_errors
def gpu(archs: tuple[str, ...], device: str, width: float, size: int | None, modes: tuple[str, ...],
        repeats: int, eval_repeats: int, time_limit: float, parity: bool, seed: int, out: Path | None,
        as_json: bool) -> None:  # fmt: skip
    """Time the PyTorch CUDA path at real size: UNet evaluations (batch 1 and 2), whole swap and P2P edits,
    per stage, peak GPU memory, in eager, CUDA-graph and torch.compile modes; fp16 GPU vs fp32 CPU parity.

    Models of the real SD1.5 (and SDXL) architectures, guidance-distilled with the release's boundaries and
    recipe, are built in memory on the device with seeded random weights (no files). Records the card,
    driver and versions, and whether TensorRT and ONNX Runtime's CUDA provider are present. With --device
    cpu (and --width-scale < 1) every field is present and the GPU-only rows say why they were skipped.
    """
    from icdcli.bench.gpu import bench_gpu
    from icdcli.bench.gpu_report import GpuOptions, text_report

    options = GpuOptions(
        archs=archs or ("sd15",), device=device, width=width, size=size, modes=modes or ("eager", "graphs", "compile"),
        repeats=repeats, eval_repeats=eval_repeats, time_limit=time_limit, seed=seed, parity=parity, out=out,
    )  # fmt: skip
    report = bench_gpu(options, progress=say)
    if as_json:
        console().json(report, indent=2)
    else:
        console().report(text_report(report))
