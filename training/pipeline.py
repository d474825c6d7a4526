"""The whole training chain for a small default model: VAE -> teacher -> guidance -> consistency.

Entry point:

    run_pipeline(config: PipelineConfig, out_dir, force: bool = False) -> PipelineOutputs

It writes `vae/`, `teacher/`, `guidance/` and `consistency/` under `out_dir`. A stage whose folder
already holds its `train_config.json` is finished and is skipped, unless `force`, and so are the
stages before it (a run folder holding only `guidance/` can train consistency stages); an interrupted
stage resumes from its latest checkpoint (with `force`, every stage starts from scratch). A finished
consistency stage whose step target has since been raised (`icd train --steps`) trains on from the
checkpoint it keeps (`consistency_continues`).
`PipelineConfig.smoke()` runs the chain in about a minute on two idle CPU cores.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from icdcli.training.checkpoints import latest_checkpoint
from icdcli.training.common import TrainingInterrupted, announcer
from icdcli.training.consistency import ConsistencyConfig, distill_consistency
from icdcli.training.guidance import GuidanceConfig, distill_guidance
from icdcli.training.stages import keep_stage, restore_stage
from icdcli.training.teacher import TeacherConfig, VAEConfig, train_teacher, train_vae

DONE = "train_config.json"
PRESETS = ("v1", "v2")
V2_STEPS = {"vae": 3000, "teacher": 2600, "guidance": 1200, "consistency": 600}
"""Step targets of the v2 preset (the schedule in docs/training.md): each stage fits one stretch of work on a 2-core
CPU (one thread), so that it finishes on the machine it started on and is kept (`--keep-stages`); the first plan
(teacher 8,000, guidance 1,500, consistency 1,500 steps) was about 13 CPU-hours."""
V2_GROUNDING_WEIGHT = 0.05


@dataclass
class PipelineConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    consistency: ConsistencyConfig | None = field(default_factory=ConsistencyConfig)

    @classmethod
    def smoke(cls) -> PipelineConfig:
        return cls(VAEConfig.smoke(), TeacherConfig.smoke(), GuidanceConfig.smoke(), ConsistencyConfig.smoke())

    @classmethod
    def v2(cls) -> PipelineConfig:
        """The embedded model's second generation (docs/default-model.md, "Why the maps are flat"): a two-block
        VAE, so 32x32 images give 16x16 latents and the UNet cross-attention maps of 16x16 (8x8 ones cannot outline
        a shape at P2P's threshold); a text encoder without transformer layers, so each token's state is its own
        word and position (v1's end-of-text and padding states carry the caption, its word states hardly differ);
        the grounding loss on the teacher's cross-attention (without it the maps stay flat); step targets without
        time caps: it trains to its targets over as many resumed runs as it takes."""
        return cls(
            replace(VAEConfig(), block_out_channels=(32, 64), steps=V2_STEPS["vae"], time_budget_s=None),
            replace(
                TeacherConfig(),
                text_layers=0,
                grounding_weight=V2_GROUNDING_WEIGHT,
                steps=V2_STEPS["teacher"],
                time_budget_s=None,
            ),
            replace(GuidanceConfig(), steps=V2_STEPS["guidance"], time_budget_s=None),
            replace(ConsistencyConfig(), steps=V2_STEPS["consistency"], time_budget_s=None),
        )

    @classmethod
    def v2_smoke(cls) -> PipelineConfig:
        """`smoke()` with v2's architecture: checks that the v2 chain builds, trains and packages, in seconds."""
        v2, smoke = cls.v2(), cls.smoke()
        return cls(
            replace(smoke.vae, block_out_channels=v2.vae.block_out_channels),
            replace(smoke.teacher, text_layers=v2.teacher.text_layers, grounding_weight=v2.teacher.grounding_weight),
            smoke.guidance,
            smoke.consistency,
        )

    @classmethod
    def preset(cls, name: str, *, smoke: bool = False) -> PipelineConfig:
        """A named configuration: `v1` (the first embedded model's, time-capped) or `v2`; `smoke` its seconds-long
        form."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        if name == "v2":
            return cls.v2_smoke() if smoke else cls.v2()
        return cls.smoke() if smoke else cls()

    def with_seed(self, seed: int) -> PipelineConfig:
        return self.updated(seed=seed)

    def updated(self, **changes: Any) -> PipelineConfig:
        """The same chain with `changes` (fields every stage config has: seed, show_progress, tracker, ...)."""
        stages = (self.vae, self.teacher, self.guidance, self.consistency)
        return PipelineConfig(*(None if c is None else replace(c, **changes) for c in stages))


@dataclass
class PipelineOutputs:
    vae: Path
    teacher: Path
    guidance: Path
    consistency: Path


def resuming(stage: Any, force: bool) -> Any:
    """A stage's config as the chain runs it: from scratch when forced, else from the checkpoint its
    `resume` names or, by default, from its latest one."""
    return replace(stage, resume=None if force else (stage.resume or "latest"))


def finished_steps(folder: Path) -> int | None:
    """The steps a finished stage trained (the metrics of its `train_config.json`); None when unknown."""
    try:
        record = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    metrics = record.get("metrics") if isinstance(record, dict) else None
    steps = metrics.get("steps") if isinstance(metrics, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def consistency_continues(
    folder: Path, config: ConsistencyConfig, say: Callable[[str], None], *, target: bool | None = None
) -> bool:
    """Whether the finished consistency stage in `folder` trains on to `config.steps`: it has fewer steps and keeps
    the checkpoint to resume from (what it says either way). Only when `config.steps` is a target (`target`; None:
    when the stage has no time cap): a stage a time cap finished (v1's default) is kept, so that running the
    command again does not train again."""
    done = finished_steps(folder)
    target = config.time_budget_s is None if target is None else target
    if not target or done is None or done >= config.steps:
        return False
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        say(f"finished at {done} steps and kept: its checkpoints are gone, so it cannot train on to {config.steps}; "
            "--force trains it again from scratch")  # fmt: skip
        return False
    say(f"finished at {done} steps; training on to {config.steps} from {checkpoint}")
    return True


def run_pipeline(
    config: PipelineConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    keep: str | Path | None = None,
    step_target: bool | None = None,
) -> PipelineOutputs:
    """Train the chain into `out_dir`, each stage resumed or skipped as the module says (`step_target`: whether the
    consistency stage's steps are a target to train a finished stage on to, see `consistency_continues`).

    With `keep` (a folder that outlives the machine, e.g. one under version control), each finished stage is also
    written there in float16 (`training.stages`), and a stage finished there but not in `out_dir` is restored from
    it instead of trained again (a kept stage has no checkpoints: it cannot train on)."""
    out = Path(out_dir)
    paths = PipelineOutputs(out / "vae", out / "teacher", out / "guidance", out / "consistency")
    kept = None if keep is None else Path(keep)

    def keep_finished(path: Path) -> None:
        stale = kept is not None and finished_steps(kept / path.name) != finished_steps(path)  # trained on since
        if kept is not None and (path / DONE).exists() and (force or stale or not (kept / path.name / DONE).exists()):
            announcer(True, path.name)(f"keeping the finished stage in {kept / path.name} (float16 weights)")
            keep_stage(path, kept / path.name)

    if kept is not None and not force:
        for path in (paths.vae, paths.teacher, paths.guidance, paths.consistency):
            if not (path / DONE).exists() and (kept / path.name / DONE).exists():
                announcer(True, path.name)(f"restored from {kept / path.name} (float16 weights, kept earlier)")
                restore_stage(kept / path.name, path)
            keep_finished(path)

    def pending(path: Path, show: bool) -> bool:
        if force or not (path / DONE).exists():
            return True
        announcer(show, path.name)(f"finished earlier, kept ({path / DONE})")
        return False

    # An earlier stage is needed only to train a later one: a finished guidance stage is all that
    # consistency distillation (and its ablation variants) reads.
    if pending(paths.guidance, config.guidance.show_progress):
        if pending(paths.teacher, config.teacher.show_progress):
            if pending(paths.vae, config.vae.show_progress):
                train_vae(resuming(config.vae, force), paths.vae)
                keep_finished(paths.vae)
            train_teacher(resuming(config.teacher, force), paths.vae, paths.teacher)
            keep_finished(paths.teacher)
        distill_guidance(resuming(config.guidance, force), paths.teacher, paths.guidance)
        keep_finished(paths.guidance)
    consistency = config.consistency
    say_consistency = announcer(consistency is not None and consistency.show_progress, "consistency")
    if consistency is not None and (  # None: stop after guidance
        (not force and consistency_continues(paths.consistency, consistency, say_consistency, target=step_target))
        or pending(paths.consistency, consistency.show_progress)
    ):
        distill_consistency(resuming(consistency, force), paths.guidance, paths.consistency)
        keep_finished(paths.consistency)
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m icdcli.training.pipeline OUT_DIR [--preset v1|v2] [--smoke] [--seed N] [--force]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m icdcli.training.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the seconds-long configuration of every stage")
    parser.add_argument("--preset", choices=PRESETS, default="v1", help="v1 (time-capped) or v2 (step targets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain stages that are already finished")
    parser.add_argument("--keep-stages", type=Path, default=None, help="keep finished stages here (float16)")
    args = parser.parse_args(argv)
    config = PipelineConfig.preset(args.preset, smoke=args.smoke).with_seed(args.seed)
    try:
        outputs = run_pipeline(config, args.out_dir, force=args.force, keep=args.keep_stages)
    except TrainingInterrupted as stop:
        where = f"saved to {stop.checkpoint}" if stop.checkpoint is not None else "had no checkpoint yet"
        print(f"interrupted: the {stop.stage} stage {where}; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    print(outputs)


if __name__ == "__main__":
    main()
