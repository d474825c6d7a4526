"""`icd train`: distil an iCD model from scratch on procedural scenes, and its ablation variants.

Registered on the main group by `icdcli.cli` (`main.add_command(train)`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .cli_common import _reports_errors, _say
from .values import NumberType

VARIANT = re.compile(r"^cd(?P<steps>[234])(?P<lf>\+lf)?(?P<lr>\+lr)?$")
TWO_STEP = ((19, 499), (499, 999), 0.7)
"""Not a released configuration: the paper's 2-step ablation, one boundary halfway."""


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
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/icd"))
@click.option("--smoke", is_flag=True, help="Seconds-long configuration of every stage (checks the pipeline).")
@click.option(
    "--seed", type=NumberType("seed"), default=0, show_default=True, help="Seed of data, initialisation and noise."
)
@click.option("--force", is_flag=True, help="Retrain stages that are already finished.")
@click.option(
    "--variant",
    default=None,
    metavar="NAME",
    help="Train an ablation variant's consistency stage only (cd2, cd3, cd4, cd4+lf, cd4+lf+lr) on the run's "
    "teacher, into RUN_DIR/variants/NAME (what `icd bench inversion --variants` reads).",
)
@click.option("--minutes", type=NumberType("minutes"), default=None, help="Cap on the consistency stage's wall time.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Consistency steps to train. Given without --minutes it lifts the default 25-minute cap, so that "
    "runs (ablation variants, say) train exactly the same number of steps on any machine.",
)
@click.option("--edit-guidance", type=NumberType("edit_guidance"), default=8.0, show_default=True,
              help="Default --guidance of edits with the packaged model.")  # fmt: skip
@click.option("--name", default=None, help="Name recorded in the packaged model. Default: the run folder's name.")
@_reports_errors
def train(
    run_dir: Path,
    smoke: bool,
    seed: int,
    force: bool,
    variant: str | None,
    minutes: float | None,
    steps: int | None,
    edit_guidance: float,
    name: str | None,
) -> None:
    """Train a small iCD model from scratch on procedural scenes: VAE, teacher, guidance distillation,
    then multi-boundary consistency distillation of forward and reverse LoRAs with preservation losses.

    Finished stages are skipped (RUN_DIR/<stage>/train_config.json); an interrupted consistency stage
    resumes from its last checkpoint. The result is packaged as a model folder, RUN_DIR/model, that
    `icd edit --model RUN_DIR/model` loads.
    """
    from .training.consistency import distill_consistency
    from .training.package import package_model
    from .training.pipeline import PipelineConfig, run_pipeline

    config = (PipelineConfig.smoke() if smoke else PipelineConfig()).with_seed(seed)
    if steps is not None:
        config = replace(config, consistency=replace(config.consistency, steps=steps, time_budget_s=None))
    if minutes is not None:
        config = replace(config, consistency=replace(config.consistency, time_budget_s=minutes * 60))
    if variant is None:
        paths = run_pipeline(config, run_dir, force=force)
        consistency_dir, model_dir = paths.consistency, run_dir / "model"
    else:
        paths = run_pipeline(replace(config, consistency=None), run_dir, force=False)
        consistency_dir, model_dir = run_dir / f"consistency-{variant}", run_dir / "variants" / variant
        if force or not (consistency_dir / "icd_lora.json").is_file():
            distill_consistency(
                replace(config.consistency, **variant_settings(variant)), paths.guidance, consistency_dir
            )
    package_model(paths.guidance, consistency_dir, model_dir, name or run_dir.name, edit_guidance, half=not smoke)
    _say(f"model folder: {model_dir}")
