"""Package a training run as an icd model folder (`"format": "lora"`) that `icd --model DIR` loads.

The folder holds the guidance-distilled pipeline (the teacher: VAE, text encoder, tokenizer and the
UNet with `time_cond_proj_dim`) and the two LoRA adapters; icd fuses them on first load and caches
the fused UNets. `half=True` stores the UNet and adapters in float16 to halve the size (they are
upcast to float32 before fusing), which is how the embedded default model stays small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from icdcli.diffusion.recipe import EditRecipe
from icdcli.io.atomic import atomic_folder

PIPELINE = "pipeline"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def _copy_half(source: Path, target: Path, half: bool) -> None:
    """Copy a safetensors file, storing floating tensors as float16 when `half`; metadata is kept, and so are the
    bytes where nothing changes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if not half or all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point()):
        shutil.copyfile(source, target)  # the same bytes: a model packaged from kept stages shares their git blobs
        return
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=metadata)


def small_model_recipe(guidance: float, tau: float) -> EditRecipe:
    """The edit recipe of a model trained here: P2P with the release's SD1.5 fractions (cross 0.3, self 0.6)
    and amplify 4 on new words, seed 0: on the embedded model they edit colour, shape and background more
    often than P2P's original 0.8 / 0.4 on held-out scenes of a seed the tables do not use
    (docs/default-model.md, benchmarks/p2p_fractions.py --seed 1)."""
    return EditRecipe("p2p", guidance, tau, cross_replace=0.3, self_replace=0.6, amplify=4.0, seed=0)


def package_model(
    guidance_dir: str | Path,
    consistency_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    edit_guidance: float,
    tau: float | None = None,
    generate_guidance: float = 8.0,
    half: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model folder atomically (a temporary folder renamed at the end) and return it.

    Args:
        guidance_dir: The guidance-distilled pipeline (the teacher, VAE and text encoder).
        consistency_dir: The forward and reverse LoRA adapters and their `icd_lora.json`.
        out_dir: The model folder to write.
        name: The model's name in `icd.json`.
        edit_guidance: The classical guidance scale the model edits with by default.
        tau: The dynamic-guidance threshold; the one the consistency run used when None.
        generate_guidance: The guidance scale `icd generate` uses by default.
        half: Store the weights in float16.
        extra: More keys for `icd.json`.
    """
    guidance_dir, consistency_dir, out = Path(guidance_dir), Path(consistency_dir), Path(out_dir)
    summary = json.loads((consistency_dir / "icd_lora.json").read_text())
    with atomic_folder(out) as staging:
        pipeline = staging / PIPELINE
        pipeline.mkdir()
        for part in PIPELINE_PARTS:
            source = guidance_dir / part
            if source.is_dir():
                shutil.copytree(source, pipeline / part)
            elif source.is_file():
                shutil.copy2(source, pipeline / part)
        (pipeline / "unet").mkdir()
        shutil.copy2(guidance_dir / "unet" / "config.json", pipeline / "unet" / "config.json")
        weights = "diffusion_pytorch_model.safetensors"
        _copy_half(guidance_dir / "unet" / weights, pipeline / "unet" / weights, half)
        for role in ("forward", "reverse"):
            _copy_half(consistency_dir / summary[role], staging / summary[role], half)
        manifest = {
            "format": "lora",
            "name": name,
            "base": PIPELINE,
            "forward_lora": summary["forward"],
            "reverse_lora": summary["reverse"],
            "edit": small_model_recipe(edit_guidance, summary["tau"] if tau is None else tau).to_json(),
            "generate_guidance": generate_guidance,
            **(extra or {}),
        }
        (staging / "icd.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
