"""Finished training stages kept where they outlive the machine: a folder under version control.

A run folder (`icd train RUN`) lives on one machine: its resume points (`<stage>/checkpoints/`) survive only while
work there goes on. What a later machine needs is each *finished* stage: its weights in float16 safetensors (no
optimizer state, no pickles), its configs, `train_config.json` (the stage's configuration and checks) and
`losses.jsonl`. `keep_stage` writes that copy into a kept folder (`--keep-stages DIR`, e.g. a folder of the
repository that is committed); `restore_stage` writes it back into a run folder in float32, so a fresh machine
resumes from the last kept stage instead of from scratch.

The run that finished a stage continues from the same float16-rounded weights a fresh machine would restore (the
stage is written back from its kept copy at once), so the chain gives the same model whichever machine trains
each stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DONE = "train_config.json"
SKIPPED = ("checkpoints", "logs")
"""Folders of a stage that are never kept: resume points (optimizer state) and tracker logs."""


def _convert(source: Path, target: Path, dtype: torch.dtype) -> None:
    """A safetensors file with its floating tensors in `dtype` (integers as they are), metadata kept."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {}
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            tensor = handle.get_tensor(key)
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(target), metadata=metadata)


def _copy_tree(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Every file under `source` but the skipped folders into `target`, safetensors converted to `dtype`."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.parts[0] in SKIPPED:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            _convert(path, destination, dtype)
        elif path.suffix == ".json" and path.name.endswith("config.json"):
            _copy_config(path, destination)
        else:
            shutil.copy2(path, destination)


def _copy_config(source: Path, target: Path) -> None:
    """A JSON config as it may travel: without `_name_or_path` (where diffusers/transformers loaded it from) and
    with every absolute path of the training machine (a stage's `teacher` folder, say) named by its last part
    beside the stage (`../teacher`): those folders say nothing on another machine, and name this one's."""
    try:
        data = json.loads(source.read_text())
    except ValueError:
        shutil.copy2(source, target)
        return
    if not isinstance(data, dict):
        shutil.copy2(source, target)
        return
    portable = {key: _portable(value) for key, value in data.items() if key != "_name_or_path"}
    if portable == data:
        shutil.copy2(source, target)
    else:
        target.write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")


def _portable(value: Any) -> Any:
    """An absolute path as `../<its last part>`; anything else as it is."""
    if isinstance(value, str) and len(value) > 1 and Path(value).is_absolute():
        return f"../{Path(value).name}"
    return value


def _replace_folder(build: Path, folder: Path) -> None:
    """`folder` becomes what was built in `build` (the previous contents gone only once the new ones are whole)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    build.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def is_finished(folder: Path) -> bool:
    return (folder / DONE).is_file()


def keep_stage(stage_dir: str | Path, kept_dir: str | Path) -> Path:
    """Write the finished stage `stage_dir` to `kept_dir` (float16 weights, configs, checks) and write it back into
    the run from that copy, so this run continues from what a fresh machine would restore. Returns `kept_dir`."""
    stage, kept = Path(stage_dir), Path(kept_dir)
    if not is_finished(stage):
        raise ValueError(f"{stage} is not a finished stage (no {DONE})")
    build = kept.with_name(kept.name + ".partial")
    shutil.rmtree(build, ignore_errors=True)
    _copy_tree(stage, build, torch.float16)
    _replace_folder(build, kept)
    restore_stage(kept, stage)
    return kept


def restore_stage(kept_dir: str | Path, stage_dir: str | Path) -> Path:
    """Write a kept stage into a run folder with float32 weights (what training reads). Returns `stage_dir`."""
    kept, stage = Path(kept_dir), Path(stage_dir)
    if not is_finished(kept):
        raise ValueError(f"{kept} is not a kept stage (no {DONE})")
    build = stage.with_name(stage.name + ".restoring")
    shutil.rmtree(build, ignore_errors=True)
    _copy_tree(kept, build, torch.float32)
    for name in SKIPPED:  # written back over a run's own stage: its resume points and logs stay
        if (stage / name).exists():
            (stage / name).rename(build / name)
    _replace_folder(build, stage)
    return stage


def kept_checks(kept_dir: str | Path) -> dict:
    """The metrics a kept stage recorded in its `train_config.json` (empty when it recorded none)."""
    data = json.loads((Path(kept_dir) / DONE).read_text())
    return dict(data.get("metrics") or {})
