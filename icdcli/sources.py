"""Turning what the user named (`--model` and the part flags) into a loaded model.

`--model` takes the name of a preset of the released checkpoints, a model folder (`icd.json`
inside), or nothing for the model embedded in the package. `--base`, `--teacher`,
`--forward-lora` and `--reverse-lora` give the parts by local path; with a preset they replace the
files it would fetch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelSourceError
from .models import MODEL_JSON, ICDModel, LoraSources, load_lora_cached, load_model_folder

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MODEL = "default"

BASE_PATTERNS = [
    "model_index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "tokenizer*/*",
    "unet/config.json",
]


@dataclass(frozen=True)
class Preset:
    """A released iCD checkpoint: base pipeline, LoRA files and guidance-distilled teacher on the hub."""

    name: str
    description: str
    base: str
    lora_repo: str
    forward_file: str
    reverse_file: str
    teacher_repo: str | None
    teacher_file: str | None
    edit_guidance: float
    tau: float


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "sd15",
            "SD1.5, 4 steps, tau 0.8 (the paper's SD1.5 editing setup)",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "dbaranchuk/icd-lora-sd15",
            "forward-19-259-519-779.safetensors",
            "reverse-259-519-779-999.safetensors",
            "alexnasa/Inverse-and-Edit",
            "sd15_cfg_distill.pt",
            19.0,
            0.8,
        ),
        Preset(
            "sd15-tau0.7",
            "SD1.5, 4 steps, tau 0.7",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "dbaranchuk/icd-lora-sd15",
            "forward-19-249-499-699.safetensors",
            "reverse-249-499-699-999.safetensors",
            "alexnasa/Inverse-and-Edit",
            "sd15_cfg_distill.pt",
            19.0,
            0.7,
        ),
        Preset(
            "sd15-3step",
            "SD1.5, 3 steps, tau 0.7",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "dbaranchuk/icd-lora-sd15",
            "forward-19-339-699.safetensors",
            "reverse-339-699-999.safetensors",
            "alexnasa/Inverse-and-Edit",
            "sd15_cfg_distill.pt",
            19.0,
            0.7,
        ),
        Preset(
            "sdxl",
            "SDXL, 4 steps, tau 0.7 (the paper's SDXL editing setup; teacher given with --teacher)",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "dbaranchuk/icd-lora-sdxl",
            "forward-19-249-499-699.safetensors",
            "reverse-249-499-699-999.safetensors",
            None,
            None,
            8.0,
            0.7,
        ),
    )
}


@dataclass
class ModelRequest:
    """What the user asked for on the command line."""

    model: str | None = None
    base: str | None = None
    teacher: str | None = None
    forward_lora: str | None = None
    reverse_lora: str | None = None

    @property
    def label(self) -> str:
        if self.forward_lora or self.reverse_lora:
            return f"{self.model or 'lora'}:{Path(self.reverse_lora or '').name}"
        return self.model or DEFAULT_MODEL


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):
        if not local_only and _offline():
            break
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=local_only))
        except Exception:  # not cached / no network / no such repo: all mean "not available"
            continue
    return None


def _hub_pipeline(repo: str, with_unet: bool) -> Path | None:
    from huggingface_hub import snapshot_download

    patterns = BASE_PATTERNS + (["unet/diffusion_pytorch_model.safetensors"] if with_unet else [])
    for local_only in (True, False):
        if not local_only and _offline():
            break
        try:
            folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))
        except Exception:  # not cached / no network: "not available"
            continue
        if (folder / "vae").is_dir():
            return folder
    return None


def _local(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelSourceError(f"{flag} {path} does not exist")
    return resolved


def preset_sources(preset: Preset, request: ModelRequest) -> LoraSources:
    """Local paths of a preset's parts: the user's flags first, then the hub cache, then the network."""
    missing: list[str] = []
    teacher = _local(request.teacher, "--teacher")
    if teacher is None and preset.teacher_repo is not None:
        teacher = _hub_file(preset.teacher_repo, preset.teacher_file)
        if teacher is None:
            missing.append(f"--teacher ({preset.teacher_repo}/{preset.teacher_file})")
    if teacher is None and preset.teacher_repo is None:
        missing.append("--teacher (the guidance-distilled teacher, published by the authors as a tar.gz archive)")
    files: dict[str, Path | None] = {}
    for flag, given, filename in (
        ("--forward-lora", request.forward_lora, preset.forward_file),
        ("--reverse-lora", request.reverse_lora, preset.reverse_file),
    ):
        files[flag] = _local(given, flag) or _hub_file(preset.lora_repo, filename)
        if files[flag] is None:
            missing.append(f"{flag} ({preset.lora_repo}/{filename})")
    base = _local(request.base, "--base") or _hub_pipeline(preset.base, with_unet=False)
    if base is None:
        missing.append(f"--base ({preset.base}, a diffusers pipeline folder)")
    if missing:
        raise ModelSourceError(
            f"preset {preset.name!r} needs files that are neither cached nor downloadable here: "
            + "; ".join(missing)
            + ". Download them where a network exists, or give local paths with the flags named."
        )
    return LoraSources(
        base,
        teacher,
        files["--forward-lora"],
        files["--reverse-lora"],
        name=preset.name,
        edit_guidance=preset.edit_guidance,
        tau=preset.tau,
    )


def _part_sources(request: ModelRequest) -> LoraSources:
    if not (request.base and request.forward_lora and request.reverse_lora):
        raise ModelSourceError(
            "loading from parts needs --base (a diffusers pipeline folder), --forward-lora and --reverse-lora; "
            "--teacher is the guidance-distilled UNet state dict (optional)"
        )
    base = _local(request.base, "--base")
    if not base.is_dir():
        raise ModelSourceError(f"--base {request.base} must be a diffusers pipeline folder")
    return LoraSources(
        base,
        _local(request.teacher, "--teacher"),
        _local(request.forward_lora, "--forward-lora"),
        _local(request.reverse_lora, "--reverse-lora"),
        name=Path(request.reverse_lora).parent.name,
    )


def load_requested_model(
    request: ModelRequest, need_teacher: bool = False, progress: Callable[[str], None] | None = None
) -> ICDModel:
    """Load whatever `request` names; raises ModelSourceError with what to do when it cannot."""
    name = request.model
    if name in PRESETS:
        return load_lora_cached(preset_sources(PRESETS[name], request), need_teacher, progress)
    if request.forward_lora or request.reverse_lora or request.base:
        if name not in (None, DEFAULT_MODEL):
            raise ModelSourceError("--base/--teacher/--forward-lora/--reverse-lora go with a preset name or no --model")
        return load_lora_cached(_part_sources(request), need_teacher, progress)
    if name in (None, DEFAULT_MODEL):
        if not (DEFAULT_MODEL_DIR / MODEL_JSON).is_file():
            raise ModelSourceError(
                "this installation has no embedded default model: pass --model with a model folder or one of "
                + ", ".join(PRESETS)
            )
        return load_model_folder(DEFAULT_MODEL_DIR, need_teacher, progress)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return load_model_folder(folder, need_teacher, progress)
    raise ModelSourceError(f"--model {name!r} is neither a model folder nor a preset; presets: {', '.join(PRESETS)}")
