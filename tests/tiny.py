"""Tiny random models in exactly the formats icd loads: diffusers pipelines, teacher state dicts
(with `time_cond_proj_dim`), PEFT LoRA files with the released key layout, and merged folders."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from icdcli.bench.scale_models import LORA_PREFIX, LORA_TARGETS
from icdcli.training.tokenizer import build_word_tokenizer

WORDS = "a an the cat dog red blue green circle square photo of on background white black".split()
TEXT_LENGTH = 12


def _text_encoder(tokenizer, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()


def _unet(family: str, seed: int, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        time_cond_proj_dim=time_cond_proj_dim,
    )
    if family == "sdxl":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    else:
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
    return unet.eval()


def save_pipeline(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """A diffusers base pipeline folder (vae, text encoder(s), tokenizer(s), unet, scheduler)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizer = build_word_tokenizer(WORDS, TEXT_LENGTH)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    parts = dict(vae=_vae(seed), unet=_unet(family, seed + 1), scheduler=scheduler, tokenizer=tokenizer)
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            text_encoder=_text_encoder(tokenizer, False, seed + 2),
            text_encoder_2=_text_encoder(tokenizer, True, seed + 3),
            tokenizer_2=build_word_tokenizer(WORDS, TEXT_LENGTH),
            **parts,
        )
    else:
        pipeline = StableDiffusionPipeline(
            text_encoder=_text_encoder(tokenizer, False, seed + 2),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def make_teacher(family: str = "sd15", seed: int = 10, guidance_distilled: bool = True):
    """A teacher UNet with the released mechanism: `time_cond_proj_dim=512` adds `time_embedding.cond_proj`."""
    unet = _unet(family, seed, 512 if guidance_distilled else None)
    if guidance_distilled:
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.normal_(0, 0.02)
    return unet


def make_peft_lora(teacher, seed: int, rank: int = 4, alpha: float = 8.0):
    """The teacher wrapped in PEFT with random (non-zero) LoRA weights, as training would leave it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(teacher),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), init_lora_weights=True),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def save_released_lora(peft_model, path: Path, alpha_in_metadata: float | None = None) -> Path:
    """Save in the released layout: `unet.base_model.model.<module>.lora_A.weight`."""
    from peft import get_peft_model_state_dict

    state = {LORA_PREFIX + key.removeprefix("base_model.model."): value.contiguous()
             for key, value in get_peft_model_state_dict(peft_model).items()}  # fmt: skip
    metadata = None if alpha_in_metadata is None else {"lora_alpha": str(alpha_in_metadata)}
    save_file(state, str(path), metadata=metadata)
    return path


@dataclass
class TinyParts:
    """Everything of a tiny released-format model, and the by-hand fused UNets to compare with."""

    base: Path
    teacher_pt: Path
    teacher_safetensors: Path
    forward_lora: Path
    reverse_lora: Path
    teacher: torch.nn.Module
    forward_by_hand: torch.nn.Module
    reverse_by_hand: torch.nn.Module


def make_parts(
    folder: Path,
    family: str = "sd15",
    forward: tuple[int, ...] = (19, 259, 519, 779),
    reverse: tuple[int, ...] = (259, 519, 779, 999),
    rank: int = 4,
    alpha: float = 8.0,
) -> TinyParts:
    folder.mkdir(parents=True, exist_ok=True)
    base = save_pipeline(folder / "base", family)
    teacher = make_teacher(family)
    teacher_pt = folder / "teacher_cfg_distill.pt"
    torch.save(teacher.state_dict(), teacher_pt)
    teacher_safetensors = folder / "teacher_cfg_distill.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_safetensors))
    loras = {}
    by_hand = {}
    for role, bounds, seed in (("forward", forward, 1), ("reverse", reverse, 2)):
        peft_model = make_peft_lora(teacher, seed, rank, alpha)
        name = f"{role}-{'-'.join(map(str, bounds))}.safetensors"
        loras[role] = save_released_lora(peft_model, folder / name, None if alpha == 8.0 else alpha)
        by_hand[role] = peft_model.merge_and_unload().eval()
    return TinyParts(
        base, teacher_pt, teacher_safetensors, loras["forward"], loras["reverse"], teacher,
        by_hand["forward"], by_hand["reverse"],
    )  # fmt: skip
