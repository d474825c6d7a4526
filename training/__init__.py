"""Training of iCD models: procedural data, a small teacher, guidance and consistency distillation.

Stages and their entry points (each stage's module documents its outputs):

    icdcli.training.teacher.train_vae(VAEConfig, out_dir)
    icdcli.training.teacher.train_teacher(TeacherConfig, vae_dir, out_dir)
    icdcli.training.guidance.distill_guidance(GuidanceConfig, teacher_dir, out_dir)
    icdcli.training.consistency.distill_consistency(ConsistencyConfig, guidance_dir, out_dir)
    icdcli.training.pipeline.run_pipeline(PipelineConfig, out_dir)

Every config has a `smoke()` constructor that runs in seconds. The names above are importable from
`icdcli.training` directly; the heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VAEConfig": "teacher",
    "TeacherConfig": "teacher",
    "train_vae": "teacher",
    "train_teacher": "teacher",
    "GuidanceConfig": "guidance",
    "distill_guidance": "guidance",
    "ConsistencyConfig": "consistency",
    "distill_consistency": "consistency",
    "PipelineConfig": "pipeline",
    "run_pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
