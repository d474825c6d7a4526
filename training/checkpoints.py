"""Resume points of a training stage: `OUT/checkpoints/step-N/`, each written whole or not at all.

A checkpoint is `accelerator.save_state` (models, optimizers, registered objects such as learning-rate
schedules and EMAs, random states) plus `step.json`. It is written into `checkpoints/.step-N.partial/`
and renamed into place once complete, so a run killed mid-write leaves the previous checkpoints as
they were; a folder without `step.json` is never a resume point.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from icdcli.core.errors import no_space_error

CHECKPOINTS = "checkpoints"
STEP_FILE = "step.json"
NAME = re.compile(r"^step-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The step a complete checkpoint folder was saved at; None for anything else."""
    match = NAME.match(folder.name)
    if match is None or not (folder / STEP_FILE).is_file():
        return None
    try:
        return int(json.loads((folder / STEP_FILE).read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a stage's folder, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, folder) for folder in root.iterdir() if (step := checkpoint_step(folder)) is not None]
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    folders = list_checkpoints(out_dir)
    return folders[-1] if folders else None


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """The checkpoint a stage starts from: None (from scratch), "latest" (None if there is none) or a folder."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if checkpoint_step(path) is None:
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (step-N with {STEP_FILE})")
    return path


def clear_checkpoints(out_dir: str | Path) -> None:
    """Forget a stage's resume points (a run that starts from scratch must not resume from an older one)."""
    shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)


def _replace_folder(staging: Path, target: Path) -> None:
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


class Checkpointer:
    """Saves a stage's accelerate state every `every` steps (and on demand), keeping the newest `kept`."""

    def __init__(self, accelerator: Any, out_dir: str | Path, *, every: int, kept: int, last: Path | None = None):
        self.accelerator = accelerator
        self.root = Path(out_dir) / CHECKPOINTS
        self.every = every
        self.kept = max(1, kept)
        self.last = last

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int) -> Path:
        accelerator = self.accelerator
        target = self.root / f"step-{step}"
        staging = self.root / f".step-{step}.partial"
        if accelerator.is_main_process:
            for stale in self.root.glob(".step-*"):  # left by a run killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
        except Exception as error:  # a full disk, in safetensors' or torch.save's words: the half-written one goes
            full = no_space_error(error, self.root)
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            if full is None:
                raise
            raise full from error
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / STEP_FILE).write_text(json.dumps({"step": step}) + "\n")
            _replace_folder(staging, target)
            for old in list_checkpoints(self.root.parent)[: -self.kept]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last = target
        return target

    def at(self, step: int) -> Path:
        """A checkpoint of `step`: the one already saved there, else a new one."""
        if self.last is not None and self.last.name == f"step-{step}" and self.last.is_dir():
            return self.last
        return self.save(step)

    def agree(self, requested: bool) -> bool:
        """Whether any process asked to stop: every process must stop (and save) at the same step."""
        if self.accelerator.num_processes == 1:
            return requested
        import torch

        flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
