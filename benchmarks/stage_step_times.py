"""Seconds per training step of each stage of an `icd train` preset on this machine: a few steps of each stage
(on 1,024 training scenes, no time caps), timed around the stage's step function; the first step is left out.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/stage_step_times.py v2 /tmp/steps-v2 --steps 10
    python benchmarks/stage_step_times.py v2 /tmp/steps-v2-bf16 --steps 10 --mixed-precision bf16   # both cores

The VAE runs twice the steps, consistency half (at least 4). Prints one JSON object: seconds per step by stage.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import icdcli.training.common as common
from icdcli.training.pipeline import PRESETS, PipelineConfig, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("out", type=Path, help="a fresh run folder (its stages are trained, a few steps each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16"], default="no",
        help="the teacher, guidance and consistency stages under accelerate's autocast (the VAE has no such option)",
    )  # fmt: skip
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    run_steps = common.run_steps

    def timed(step_fn, **kwargs):
        marks: list[float] = []

        def step(index: int):
            result = step_fn(index)
            marks.append(time.perf_counter())
            return result

        done = run_steps(step, **kwargs)
        seconds[kwargs["desc"]] = round((marks[-1] - marks[0]) / (len(marks) - 1), 3)
        return done

    common.run_steps = timed  # run_stage looks it up in common at each call
    config = PipelineConfig.preset(args.preset)
    small = dict(train_scenes=1024, checkpoint_every=10**6, log_every=2, show_progress=False, time_budget_s=None)
    config = PipelineConfig(
        replace(config.vae, steps=args.steps * 2, scaling_scenes=256, heldout_scenes=128, **small),
        replace(config.teacher, steps=args.steps, mixed_precision=args.mixed_precision, **small),
        replace(config.guidance, steps=args.steps, mixed_precision=args.mixed_precision, **small),
        replace(config.consistency, steps=max(4, args.steps // 2), mixed_precision=args.mixed_precision, **small),
    )
    run_pipeline(config, args.out)
    print(json.dumps({args.preset: seconds}))


if __name__ == "__main__":
    main()
