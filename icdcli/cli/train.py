"""`icd train`: distil an iCD model from scratch on procedural scenes, and its ablation variants.

Registered on the main group by `icdcli.cli.main` (`main.add_command(train)`).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import NumberType, TextPath, text_callback

VARIANT = re.compile(r"^cd(?P<steps>[234])(?P<lf>\+lf)?(?P<lr>\+lr)?$")
TWO_STEP = ((19, 499), (499, 999), 0.7)
"""Not a released configuration: the paper's 2-step ablation, one boundary halfway."""
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX")}
"""Trackers `--tracker` offers (through accelerate) and the packages any one of which each needs."""


def missing_package(tracker: str | None) -> str | None:
    """What `icd train` lacks to run, as the one line that says how to get it; None when all is there."""
    if importlib.util.find_spec("accelerate") is None:
        return "icd train needs accelerate, which is not installed: run pip install accelerate"
    if tracker is not None and not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[tracker]):
        return f"--tracker {tracker} needs the {tracker} package, which is not installed: run pip install {tracker}"
    return None


def resume_command(ctx: click.Context) -> str:
    """The command line that continues this run: the same arguments, less --force (which starts over)."""
    from click.core import ParameterSource

    words = ["icd", "train"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        value = ctx.params.get(param.name)
        if param.name == "force" or (param.name != "run_dir" and source in (None, ParameterSource.DEFAULT)):
            continue
        if isinstance(param, click.Argument):
            words.extend([] if value is None else [shlex.quote(str(value))])
        elif getattr(param, "is_flag", False):
            words.extend([param.opts[0]] if value else [])
        else:
            words.extend([param.opts[0], shlex.quote(str(value))])
    return " ".join(words)


def interrupted_message(stage: str | None, step: int | None, checkpoint: Path | None, command: str) -> str:
    """The line Ctrl-C leaves: what was saved, where, and the command that resumes."""
    if checkpoint is not None:
        at = f" at step {step}" if step is not None else ""
        return f"interrupted: the {stage} stage saved{at} to {checkpoint}; run {command} to resume from there"
    if stage is not None:
        return f"interrupted: the {stage} stage had no checkpoint yet; run {command} to train it again"
    return f"interrupted: finished stages and saved checkpoints are kept; run {command} to continue"


def variant_settings(name: str) -> dict[str, Any]:
    """ConsistencyConfig fields of an ablation variant: `cd{2,3,4}` with optional `+lf` and `+lr`.

    cd4 = 4 steps (tau 0.8 boundaries) without preservation losses; +lf adds the forward one, +lr the
    reverse one (only after +lf, as in the paper's table).
    """
    match = VARIANT.match(name)
    if match is None or (match["lr"] and not match["lf"]):
        raise click.BadParameter(f"{name!r}: expected cd2, cd3, cd4, cd4+lf or cd4+lf+lr", param_hint="--variant")
    steps = int(match["steps"])
    fields: dict[str, Any] = {
        "forward_preservation": 1.5 if match["lf"] else 0.0,
        "reverse_preservation": 1.5 if match["lr"] else 0.0,
    }
    if steps == 4:
        fields["boundaries"] = "4step-tau0.8"
    elif steps == 3:
        fields["boundaries"] = "3step-tau0.7"
    else:
        fields["forward_boundaries"], fields["reverse_boundaries"], fields["tau"] = TWO_STEP
    return fields


@click.command("train")
@click.argument("run_dir", type=TextPath(file_okay=False, path_type=Path), required=False)
@click.option(
    "--preset",
    type=click.Choice(["v1", "v2"]),
    default="v1",
    show_default=True,
    help="Configuration: v1, the first embedded model's (each stage capped in time), or v2, the second "
    "generation's (16x16 latents, a text encoder without layers, step targets without time caps: run the "
    "command again until it finishes). "
    "RUN_DIR defaults to runs/icd for v1 and to the cache's train/v2 for v2.",
)
@click.option("--smoke", is_flag=True, help="Seconds-long configuration of every stage (checks the pipeline).")
@click.option(
    "--seed", type=NumberType("seed"), default=0, show_default=True, help="Seed of data, initialisation and noise."
)
@click.option(
    "--force",
    is_flag=True,
    help="Retrain from scratch, finished or not, every stage (with --variant: the variant's), discarding their "
    "checkpoints and loss logs.",
)
@click.option(
    "--variant",
    default=None,
    metavar="NAME",
    help="Train an ablation variant's consistency stage only (cd2, cd3, cd4, cd4+lf, cd4+lf+lr) on the run's "
    "teacher, into RUN_DIR/variants/NAME (what `icd bench inversion --variants` reads).",
)
@click.option(
    "--minutes",
    type=NumberType("minutes"),
    default=None,
    help="Cap on the consistency stage's wall time in this run (a resumed stage gets the cap again).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Consistency steps to train. Given without --minutes it lifts the default 25-minute cap, so that "
    "runs (ablation variants, say) train exactly the same number of steps on any machine. A consistency stage "
    "that finished with fewer steps trains on to this many from its last checkpoint.",
)
@click.option("--edit-guidance", type=NumberType("edit_guidance"), default=8.0, show_default=True,
              help="Default --guidance of edits with the packaged model.")  # fmt: skip
@click.option(
    "--name",
    default=None,
    callback=text_callback("name"),
    help="Name recorded in the packaged model (at most 200 characters). Default: the run folder's name.",
)
@click.option(
    "--tracker",
    type=click.Choice(sorted(TRACKER_PACKAGES)),
    default=None,
    help="Also log losses through accelerate's trackers, into RUN_DIR/logs/<stage> "
    "(view with `tensorboard --logdir RUN_DIR/logs`). Needs the tensorboard package.",
)
@click.option(
    "--keep-stages",
    type=TextPath(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Also keep each finished stage in DIR, float16 weights with its configs and checks (commit DIR to carry "
    "the run to another machine); a stage kept there and missing from RUN_DIR is restored instead of retrained.",
)
@console_options
@click.pass_context
@reports_errors
def train(ctx: click.Context, **options: Any) -> None:
    """Train a small iCD model from scratch on procedural scenes: VAE, teacher, guidance distillation,
    then multi-boundary consistency distillation of forward and reverse LoRAs with preservation losses.

    Finished stages are skipped (RUN_DIR/<stage>/train_config.json); an interrupted stage, or variant,
    resumes from its last checkpoint (RUN_DIR/<stage>/checkpoints) when the command is run again.
    Ctrl-C saves a checkpoint at the end of the current step and exits with status 130. The result is
    packaged as a model folder, RUN_DIR/model, that `icd edit --model RUN_DIR/model` loads.
    """
    problem = missing_package(options["tracker"])
    if problem is not None:
        raise click.ClickException(problem)
    from icdcli.core.stopping import exit_code, handle_sigterm

    say("icd train: loading PyTorch, diffusers and accelerate")
    handle_sigterm()  # schedulers and `timeout` send SIGTERM: stop as at a second Ctrl-C, exit 143
    try:
        _train(TrainRequest(**options))
    except KeyboardInterrupt as stop:
        stage, step, checkpoint = (getattr(stop, key, None) for key in ("stage", "step", "checkpoint"))
        console().error(interrupted_message(stage, step, checkpoint, resume_command(ctx)))
        sys.exit(exit_code(stop.__cause__ if isinstance(stop.__cause__, KeyboardInterrupt) else stop))
    except Exception as error:
        from icdcli.core.errors import space_errno

        if space_errno(error) is None:
            raise
        where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
        raise click.ClickException(
            f"no space left on the device{where}: finished stages and saved checkpoints are kept; free space and run "
            f"{resume_command(ctx)} to continue"
        ) from None


def default_run_dir(preset: str) -> Path:
    """Where a run trains without RUN_DIR: v1 in runs/icd (as before), v2 in the cache, never in a checkout."""
    if preset == "v1":
        return Path("runs/icd")
    from icdcli.core.paths import cache_root

    return cache_root() / "train" / preset


@dataclass(frozen=True)
class TrainRequest:
    """The options of one `icd train` run, as the command's flags give them."""

    run_dir: Path | None
    preset: str
    smoke: bool
    seed: int
    force: bool
    variant: str | None
    minutes: float | None
    steps: int | None
    edit_guidance: float
    name: str | None
    tracker: str | None
    keep_stages: Path | None = None


def _train(request: TrainRequest) -> None:
    from icdcli.training.common import announcer
    from icdcli.training.consistency import distill_consistency
    from icdcli.training.package import package_model
    from icdcli.training.pipeline import DONE, PipelineConfig, consistency_continues, resuming, run_pipeline

    config = PipelineConfig.preset(request.preset, smoke=request.smoke).updated(
        seed=request.seed, show_progress=not console().quiet, tracker=request.tracker
    )
    consistency = config.consistency
    if request.steps is not None:
        consistency = replace(consistency, steps=request.steps, time_budget_s=None)
    if request.minutes is not None:
        consistency = replace(consistency, time_budget_s=request.minutes * 60)
    config = replace(config, consistency=consistency)
    run_dir, variant = request.run_dir or default_run_dir(request.preset), request.variant
    step_target = request.steps is not None or consistency.time_budget_s is None  # --steps: train on to them
    if variant is None:
        paths = run_pipeline(config, run_dir, force=request.force, keep=request.keep_stages, step_target=step_target)
        consistency_dir, model_dir = paths.consistency, run_dir / "model"
    else:
        paths = run_pipeline(replace(config, consistency=None), run_dir, force=False, keep=request.keep_stages)
        consistency_dir, model_dir = run_dir / f"consistency-{variant}", run_dir / "variants" / variant
        settings = replace(consistency, **variant_settings(variant))
        show = announcer(settings.show_progress, consistency_dir.name)
        if (
            request.force
            or not (consistency_dir / DONE).is_file()
            or consistency_continues(consistency_dir, settings, show, target=step_target)
        ):
            distill_consistency(resuming(settings, request.force), paths.guidance, consistency_dir)
        else:
            say(f"{consistency_dir.name}: finished earlier, kept ({consistency_dir / DONE})")
    say(f"packaging {model_dir}")
    name = request.name or run_dir.name
    package_model(
        paths.guidance,
        consistency_dir,
        model_dir,
        name=name,
        edit_guidance=request.edit_guidance,
        half=not request.smoke,
    )
    say(f"model folder: {model_dir}")
