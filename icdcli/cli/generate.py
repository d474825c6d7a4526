"""`icd generate`: an image from a prompt in the reverse model's 3-4 steps."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import check_prompt, load_model, model_record, note_unknown_prompt, reports_errors
from icdcli.cli.console import console_options, say
from icdcli.cli.options import (
    BACKEND_SECTION,
    MODEL_SECTION,
    NumberType,
    SectionedCommand,
    TextPath,
    model_options,
    overwrite_option,
    sampler_options,
    text_callback,
)
from icdcli.cli.results import emit, reported_failure
from icdcli.io.claims import sweep
from icdcli.run.outputs import GENERATE_FIELDS, check_existing, existing_record, image_text
from icdcli.run.planning import check_writable_folder, unique_path


@dataclass(frozen=True)
class _Planned:
    """A generation with its model loaded: the record its PNG carries, and what runs it."""

    loaded: Any
    record: dict[str, Any]
    text: dict[str, str]
    prompt: str
    guidance: float
    tau: float
    sampling: Any
    size: tuple[int, int]

    def run(self) -> tuple[Any, Any]:
        """The image, and the timings of the load and the decode."""
        from icdcli.editing.generation import generate as run_generate
        from icdcli.editing.stages import Timings

        timings = Timings({"load": self.loaded.seconds})
        with timings.stage("decode"):
            image = run_generate(self.loaded.model, self.prompt, guidance=self.guidance, tau=self.tau,
                                 settings=self.sampling, size=self.size)  # fmt: skip
        return image, timings


def _planned(
    prompt: str, guidance: float | None, tau: float, width: int | None, height: int | None, seed: int, sampler: str,
    ddim_steps: int, model_opts: dict[str, Any],
) -> _Planned:  # fmt: skip
    """The model loaded for a generation, its size checked, and the generation's record."""
    from icdcli.diffusion.recipe import SamplerSettings
    from icdcli.models.checkpoints import model_files

    loaded = load_model(model_opts, need_teacher=sampler == "ddim", backend=model_opts["backend"])
    model = loaded.model
    note_unknown_prompt(model, prompt, "PROMPT")
    size = (width or model.info.native_size, height or model.info.native_size)
    _check_size(size, model)
    w = guidance if guidance is not None else model.info.generate_guidance
    sampling = SamplerSettings(sampler, ddim_steps, seed)
    steps = sampling.steps(model.info.num_steps)
    record = {"command": "generate", **model_record(loaded), "sampler": sampler, "steps": steps,
              "prompt": prompt, "guidance": float(w), "tau": float(tau), "seed": seed, "width": size[0],
              "height": size[1]}  # fmt: skip
    return _Planned(loaded, record, image_text(record, model_files(model)), prompt, float(w), tau, sampling, size)


def _generate_to_stdout(
    prompt: str, guidance: float | None, tau: float, width: int | None, height: int | None, seed: int, sampler: str,
    ddim_steps: int, model_opts: dict[str, Any],
) -> None:  # fmt: skip
    """`icd generate PROMPT -o -`: the PNG, with its record, on stdout (for a pipe); a line on stderr says so."""
    from icdcli.io.images import png_bytes

    _check_size_before_loading(width, height, model_opts)
    planned = _planned(prompt, guidance, tau, width, height, seed, sampler, ddim_steps, model_opts)
    image, _ = planned.run()
    data = png_bytes(image, text=planned.text)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    say("wrote stdout")


def _check_output_folder(folder: Path) -> None:
    """The folder an output goes to must exist and be writable (one line saying so otherwise)."""
    try:
        check_writable_folder(folder)
    except OSError as error:
        raise click.ClickException(f"output folder {folder}: {error.strerror or error}; choose another -o") from None


def _memory_budget(device: str) -> int | None:
    """Free memory where the model will run: the GPU's when it runs on one, else the machine's."""
    from icdcli.run.limits import available_bytes

    if device != "cpu" and not device.startswith("mps"):
        import torch

        if torch.cuda.is_available():
            try:
                return torch.cuda.mem_get_info(torch.device(device if device.startswith("cuda") else "cuda"))[0]
            except (RuntimeError, ValueError):
                return None
    return available_bytes()


def _check_size_before_loading(width: int | None, height: int | None, model_opts: dict[str, Any]) -> None:
    """Refuse a size the model cannot take, or this machine cannot hold, before the model loads."""
    from icdcli.run.limits import model_sizes, size_problem

    if width is None and height is None:
        return
    sizes = model_sizes(model_opts["model"], model_opts["base"])
    if sizes is None:  # a preset: known once loaded (_check_size)
        return
    problem = size_problem(width or sizes.native, height or sizes.native, sizes, _memory_budget(model_opts["device"]))
    if problem:
        raise click.UsageError(problem)


def _check_size(size: tuple[int, int], model: Any) -> None:
    from icdcli.run.limits import Sizes, size_problem

    sizes = Sizes(model.info.native_size, model.info.size_multiple, model.vae_scale_factor)
    problem = size_problem(*size, sizes, _memory_budget(str(model.device)))
    if problem:
        raise click.UsageError(problem)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


@click.command(
    cls=SectionedCommand,
    sections=[
        ("Generation", ["output", "guidance", "tau", "width", "height", "seed", "sampler", "ddim_steps", "as_json"]),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=['icd generate "a red circle on a blue background" -o circle.png --seed 3'],
)
@click.argument("prompt", callback=text_callback("prompt"))
@click.option(
    "-o",
    "--output",
    type=TextPath(),
    default=None,
    help="Image to write; - writes the PNG to stdout. Default: a name made from the prompt, in the current folder.",
)
@click.option(
    "--guidance",
    type=NumberType("guidance"),
    default=None,
    help="Classical CFG scale w. Default: the model's (8 for SD).",
)
@click.option(
    "--tau",
    type=NumberType("tau"),
    default=1.0,
    show_default=True,
    help="Dynamic guidance threshold; 1 guides every step.",
)
@click.option(
    "--width",
    type=NumberType("width"),
    default=None,
    help="Width in pixels, a multiple of the model's size step (64 for SD1.5/SDXL, 8 for the embedded model). "
    "Default: the model's native size.",
)
@click.option(
    "--height",
    type=NumberType("height"),
    default=None,
    help="Height in pixels, a multiple of the model's size step. Default: the model's native size.",
)
@overwrite_option
@sampler_options
@model_options
@console_options
@reports_errors
def generate(
    prompt: str,
    output: str | None,
    guidance: float | None,
    tau: float,
    width: int | None,
    height: int | None,
    overwrite: bool,
    seed: int | None,
    sampler: str,
    ddim_steps: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Generate an image from PROMPT in the reverse model's 3-4 steps.

    The PNG records its parameters; an existing file is replaced only with --overwrite (one made with the
    same parameters is skipped).
    """
    started = time.perf_counter()
    check_prompt(prompt, "PROMPT")
    seed = 0 if seed is None else seed
    if output == "-":
        if as_json:
            raise click.UsageError("-o - writes the image to stdout, where --json's records would go: leave --json out")
        _generate_to_stdout(prompt, guidance, tau, width, height, seed, sampler, ddim_steps, model_opts)
        return
    default_name = f"{_slug(prompt)}-s{seed}.png"
    target = Path(output) if output is not None else Path(default_name)
    if output is not None and (output.endswith(("/", os.sep)) or target.is_dir()):
        target = target / default_name
    with reported_failure(as_json, prompt, target):
        _check_output_folder(target.parent)
        _check_size_before_loading(width, height, model_opts)
        sweep(target.parent)
        from icdcli.io.images import save_image

        planned = _planned(prompt, guidance, tau, width, height, seed, sampler, ddim_steps, model_opts)
        loaded = planned.loaded
        if target.name == default_name and os.path.lexists(target) and existing_record(target) is None:
            target = unique_path(target, set())  # a default name never replaces a file icd did not make
        reason = check_existing(target, planned.record, fields=GENERATE_FIELDS, overwrite=overwrite)
        if reason is not None:
            emit(as_json, {"status": "skipped", "input": prompt, "output": str(target), "reason": reason})
            return
        image, timings = planned.run()
        save_image(image, target, text=planned.text)
    timings.seconds["total"] = time.perf_counter() - started
    emit(
        as_json,
        {
            "status": "done",
            "input": prompt,
            "output": str(target),
            "model": loaded.label,
            "backend": loaded.backend,
            "seed": seed,
            "seconds": {k: round(v, 4) for k, v in timings.seconds.items()},
        },
    )
