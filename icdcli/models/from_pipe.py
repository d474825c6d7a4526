"""An iCD model over a diffusers Stable Diffusion (XL) pipeline already loaded (`icdcli.ICDEditPipeline.from_pipe`):
its VAE, text encoders and tokenizers shared, the forward and reverse UNets fused from the released LoRA files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icdcli.models.runtime import ICDModel


def model_from_pipe(
    pipeline: Any,
    *,
    forward_lora: str | os.PathLike[str],
    reverse_lora: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | None = None,
    forward_boundaries: Sequence[int] | None = None,
    reverse_boundaries: Sequence[int] | None = None,
    keep_teacher: bool = False,
    name: str = "",
) -> ICDModel:
    """The model `ICDEditPipeline.from_pipe` runs: the pipeline's VAE, text encoder(s) and tokenizer(s), shared, and
    each LoRA fused into a copy of the teacher UNet as `icd` fuses released files (`icdcli.models.unets
    .build_teacher_unet`, `icdcli.models.lora.fuse_lora`), in the pipeline UNet's dtype and on its device; the
    family's release recipe.

    Args:
        pipeline: the diffusers pipeline (its `vae`, `unet`, `text_encoder`, `tokenizer`, and for SDXL
            `text_encoder_2`, `tokenizer_2`); TypeError for another.
        forward_lora, reverse_lora: the released PEFT LoRA files (`iCD-SD15-forward_19_259_519_779.safetensors`).
        teacher: the guidance-distilled teacher UNet state dict (.safetensors, or .pt read weights-only) the
            LoRAs were trained on, in the pipeline UNet's architecture; None: the pipeline's UNet is the teacher.
        forward_boundaries, reverse_boundaries: for LoRA files whose names do not carry them.
        keep_teacher: also keep the teacher UNet, for `sampler="ddim"` (with `teacher=None` it is the
            pipeline's UNet, kept at no cost).
        name: the model's name in records; default: the reverse LoRA's folder.

    ModelSourceError for files that are missing or cannot be fused.
    """
    import copy
    import tempfile

    from icdcli.core.errors import ModelSourceError
    from icdcli.core.quiet import libraries_quieted
    from icdcli.diffusion.recipe import SD15, SDXL
    from icdcli.models.components import check_weights
    from icdcli.models.fusion import LoraSources
    from icdcli.models.identity import made_from
    from icdcli.models.info import ModelInfo
    from icdcli.models.info import info_from_networks as _describe
    from icdcli.models.lora import fuse_lora, read_lora
    from icdcli.models.runtime import ICDModel
    from icdcli.models.unets import build_teacher_unet

    family = SDXL if getattr(pipeline, "text_encoder_2", None) is not None else SD15
    suffixes = ("", "_2") if family == SDXL else ("",)
    needed = ["vae", "unet", *(f"{part}{suffix}" for suffix in suffixes for part in ("text_encoder", "tokenizer"))]
    missing = [part for part in needed if getattr(pipeline, part, None) is None]
    if missing:
        raise TypeError(f"from_pipe takes a diffusers Stable Diffusion (XL) pipeline; this one lacks {missing}")
    unet = pipeline.unet
    sources = LoraSources(
        base=Path(getattr(pipeline.config, "_name_or_path", "") or "pipeline"),
        teacher=None if teacher is None else Path(teacher),
        forward_lora=Path(forward_lora),
        reverse_lora=Path(reverse_lora),
        name=name,
        forward_boundaries=None if forward_boundaries is None else tuple(forward_boundaries),
        reverse_boundaries=None if reverse_boundaries is None else tuple(reverse_boundaries),
    )
    for label, path in (("teacher", sources.teacher), ("forward_lora", sources.forward_lora),
                        ("reverse_lora", sources.reverse_lora)):  # fmt: skip
        if path is not None and not path.is_file():
            raise ModelSourceError(f"{label} {path} does not exist")
    forward_bounds, reverse_bounds = sources.boundaries()
    dtype, device = unet.dtype, unet.device
    unets: dict[str, Any] = {}
    with libraries_quieted(), tempfile.TemporaryDirectory(prefix="icd-from-pipe-") as folder:
        base = Path(folder)
        unet.save_config(base / "unet")  # the architecture build_teacher_unet fills with the teacher's weights
        for role, path in (("forward", sources.forward_lora), ("reverse", sources.reverse_lora)):
            check_weights(path)
            try:
                adapter = read_lora(path)
                if sources.teacher is None:
                    unets[role] = fuse_lora(copy.deepcopy(unet), adapter)
                else:
                    unets[role] = build_teacher_unet(base, sources.teacher, dtype=dtype, fuse=adapter)
            except (ValueError, OSError) as error:
                raise ModelSourceError(f"cannot fuse {path}: {error}") from error
        teacher_unet = unet if sources.teacher is None else None
        if keep_teacher and sources.teacher is not None:
            teacher_unet = build_teacher_unet(base, sources.teacher, dtype=dtype)
        info_json = {
            "name": name or sources.reverse_lora.parent.name,
            "forward_boundaries": forward_bounds,
            "reverse_boundaries": reverse_bounds,
            "edit": sources.recipe(family, reverse_bounds).to_json(),
            "made_from": made_from(sources),
        }
        info = ModelInfo.from_json(_describe(info_json, unets["reverse"], pipeline.vae, family))
        encoders = [getattr(pipeline, f"text_encoder{suffix}") for suffix in suffixes]
        tokenizers = [getattr(pipeline, f"tokenizer{suffix}") for suffix in suffixes]
        model = ICDModel(info, pipeline.vae, encoders, tokenizers, unets["forward"], unets["reverse"],
                         teacher_unet=teacher_unet, source=str(sources.reverse_lora.parent))  # fmt: skip
        model.to(device, dtype, vae_dtype=pipeline.vae.dtype)
    return model
