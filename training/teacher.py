"""The teacher: a small Stable Diffusion, built from the same diffusers/transformers classes and
trained from scratch on the procedural scenes (training.scenes).

Entry points (each writes a folder that diffusers loads back as it is):

    train_vae(config: VAEConfig, out_dir) -> Path
        An `AutoencoderKL` (32x32 RGB -> 8x8x4 latents) saved with `save_pretrained`; its
        `scaling_factor` is set to 1 / std of the training latents.
    train_teacher(config: TeacherConfig, vae_dir, out_dir) -> Path
        A `CLIPTextModel` and an eps-prediction `UNet2DConditionModel` trained jointly on Stable
        Diffusion's noise schedule with 10% empty captions; saved with the VAE, the word-level
        tokenizer and SD's DDIM scheduler as a `StableDiffusionPipeline` folder (safetensors).

`VAEConfig.smoke()` and `TeacherConfig.smoke()` run in seconds. Losses go to `losses.jsonl` in the
output folder, the resolved configuration to `train_config.json` (written last: it marks the stage
finished), resume points to `checkpoints/step-N/` (`resume="latest"` or a checkpoint folder continues
from one; they are removed once the stage is finished).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from icdcli.diffusion.schedule import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, alphas_cumprod
from icdcli.training.checkpoints import clear_checkpoints
from icdcli.training.common import (
    EMA,
    announcer,
    build_latent_bank,
    encode_posteriors,
    run_stage,
    save_config,
    setup_torch,
    stage_accelerator,
    start_stage,
    step_generator,
)
from icdcli.training.scenes import render_batch, scenes, vocabulary
from icdcli.training.tokenizer import build_word_tokenizer

MAX_TOKENS = 16


@dataclass
class VAEConfig:
    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    train_scenes: int = 16_384
    batch_size: int = 32
    steps: int = 800
    time_budget_s: float | None = 480.0
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    scaling_scenes: int = 2048
    heldout_scenes: int = 512
    seed: int = 0
    log_every: int = 20
    show_progress: bool = True
    checkpoint_every: int = 100
    checkpoints_kept: int = 2
    resume: str | None = None
    tracker: str | None = None

    @classmethod
    def smoke(cls) -> VAEConfig:
        return cls(
            train_scenes=256,
            batch_size=16,
            steps=40,
            time_budget_s=None,
            lr=2e-3,
            warmup_steps=5,
            scaling_scenes=128,
            heldout_scenes=64,
            log_every=5,
            show_progress=False,
            checkpoint_every=10,
        )


@dataclass
class TeacherConfig:
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_heads: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    train_scenes: int = 16_384
    batch_size: int = 64
    steps: int = 2400
    time_budget_s: float | None = 1500.0
    lr: float = 5e-4
    text_lr: float = 5e-4
    warmup_steps: int = 200
    empty_caption_prob: float = 0.1
    grounding_weight: float = 0.0  # > 0: the grounding loss on cross-attention maps (training/grounding.py)
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 20
    show_progress: bool = True
    checkpoint_every: int = 200
    checkpoints_kept: int = 2
    resume: str | None = None
    tracker: str | None = None

    @classmethod
    def smoke(cls) -> TeacherConfig:
        return cls(
            train_scenes=256,
            batch_size=16,
            steps=40,
            time_budget_s=None,
            lr=1e-3,
            text_lr=1e-3,
            warmup_steps=5,
            ema_decay=None,
            log_every=5,
            show_progress=False,
            checkpoint_every=10,
        )


def build_vae(config: VAEConfig) -> Any:
    from diffusers import AutoencoderKL

    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, min(config.block_out_channels)),
        sample_size=config.image_size,
    )


def build_tokenizer() -> Any:
    return build_word_tokenizer(vocabulary(), max_length=MAX_TOKENS)


def build_text_encoder(config: TeacherConfig, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=config.text_width,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(
    config: TeacherConfig, latent_channels: int, latent_size: int, *, time_cond_proj_dim: int | None = None
) -> Any:
    from diffusers import UNet2DConditionModel

    blocks = len(config.block_out_channels)
    # Like SD 1.x: cross-attention everywhere but the lowest resolution, whose block is plain.
    down = ("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,  # diffusers reads this as the number of heads
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def build_scheduler() -> Any:
    """Stable Diffusion's DDIM scheduler configuration."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def vae_loss(vae: Any, images: torch.Tensor, config: VAEConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device)
    latents = posterior.mean + posterior.std * noise
    reconstruction = vae.decode(latents).sample
    l1 = F.l1_loss(reconstruction, images)
    l2 = F.mse_loss(reconstruction, images)
    kl = posterior.kl().mean() / latents[0].numel()
    total = config.l1_weight * l1 + config.l2_weight * l2 + config.kl_weight * kl
    return {"loss": total, "l1": l1, "l2": l2, "kl": kl}


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((reconstruction.float() - reference.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def vae_psnr(vae: Any, images: torch.Tensor, *, batch: int = 256) -> float:
    """Mean PSNR of posterior-mean reconstructions."""
    values = []
    for chunk in images.split(batch):
        chunk = chunk.to(vae.device, vae.dtype)
        values.append(psnr(vae.decode(vae.encode(chunk).latent_dist.mean).sample, chunk).cpu())
    return float(torch.cat(values).mean())


def train_vae(config: VAEConfig, out_dir: str | Path) -> Path:
    """Train the autoencoder, set its scaling factor and save it to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch()
    torch.manual_seed(config.seed)
    accelerator = stage_accelerator(config, out)
    show = config.show_progress and accelerator.is_local_main_process
    say = announcer(show, "vae")
    say(f"rendering {config.train_scenes} training scenes at {config.image_size}x{config.image_size}")
    images, _ = render_batch(scenes("train", config.train_scenes, seed=config.seed), config.image_size)
    say("building the autoencoder")
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    vae, optimizer = accelerator.prepare(vae, optimizer)
    accelerator.register_for_checkpointing(schedule)
    start = start_stage(accelerator, config, out, say)

    def step(index: int) -> dict[str, float]:
        generator = step_generator(config.seed, index, rank=accelerator.process_index)
        batch = images[torch.randint(len(images), (config.batch_size,), generator=generator)].to(accelerator.device)
        losses = vae_loss(vae, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        optimizer.step()
        schedule.step()
        return {k: v.item() for k, v in losses.items()}

    started = time.monotonic()
    vae.train()
    steps = run_stage(step, start, config=config, accelerator=accelerator, desc="vae", show=show)
    say(f"measuring the scaling factor and held-out PSNR, saving to {out}")
    vae = accelerator.unwrap_model(vae).eval()
    mean, std = encode_posteriors(vae, images[: config.scaling_scenes])
    samples = mean + std * torch.randn(mean.shape, generator=step_generator(config.seed, -1))
    scaling_factor = float(1.0 / samples.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    heldout, _ = render_batch(scenes("heldout", config.heldout_scenes, seed=config.seed), config.image_size)
    metrics = {
        "steps": steps,
        "resumed_from": start.step,
        "seconds": round(time.monotonic() - started, 1),
        "scaling_factor": scaling_factor,
        "heldout_psnr_db": round(vae_psnr(vae, heldout), 3),
    }
    if accelerator.is_main_process:
        vae.save_pretrained(out, safe_serialization=True)
        save_config(config, out / "train_config.json", metrics=metrics)
        clear_checkpoints(out)  # finished: the saved model is the result, resume points are dead weight
    return out


def load_vae(vae_dir: str | Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)


def eps_loss(
    unet: Any, latents: torch.Tensor, hidden_states: torch.Tensor, generator: torch.Generator, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """Stable Diffusion's objective: predict the noise of q(x_t | x0) at t ~ U{0..999}."""
    batch = latents.shape[0]
    t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    ab = alpha_bar[t].float().view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    device = latents.device
    pred = unet(noisy.to(device), t.to(device), encoder_hidden_states=hidden_states).sample
    return F.mse_loss(pred.float(), noise.to(device))


def save_pipeline(out_dir: str | Path, *, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Path:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def train_teacher(config: TeacherConfig, vae_dir: str | Path, out_dir: str | Path) -> Path:
    """Train text encoder + UNet on VAE latents of training scenes; save the pipeline to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch()
    torch.manual_seed(config.seed)
    accelerator = stage_accelerator(config, out)
    show = config.show_progress and accelerator.is_local_main_process
    say = announcer(show, "teacher")
    say(f"loading the autoencoder from {vae_dir}; building the text encoder and the UNet")
    vae = load_vae(vae_dir)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(config, tokenizer)
    latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(config, vae.config.latent_channels, latent_size)
    say(f"encoding {config.train_scenes} training scenes to latents")
    bank = build_latent_bank(
        vae, "train", count=config.train_scenes, image_size=vae.config.sample_size, seed=config.seed
    )
    alpha_bar = alphas_cumprod()
    grounding = Grounding.start(config, unet, latent_size, say) if config.grounding_weight > 0 else None
    optimizer = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": config.lr}, {"params": text_encoder.parameters(), "lr": config.text_lr}],
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    emas = (
        [EMA(accelerator.unwrap_model(m), config.ema_decay) for m in (unet, text_encoder)] if config.ema_decay else []
    )
    accelerator.register_for_checkpointing(schedule, *emas)
    start = start_stage(accelerator, config, out, say)

    def step(index: int) -> dict[str, float]:
        generator = step_generator(config.seed, index, rank=accelerator.process_index)
        latents, captions, index = bank.sample_indexed(config.batch_size, generator)
        drop = torch.rand(len(captions), generator=generator) < config.empty_caption_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        tokens = tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(accelerator.device)
        with accelerator.autocast(), Grounding.recording(grounding):
            hidden = text_encoder(tokens)[0]
            loss = eps_loss(unet, latents.to(accelerator.device), hidden, generator, alpha_bar)
            losses = {"loss": loss}
            if grounding is not None and not drop.all():
                losses["grounding"] = grounding.loss(index, keep=~drop)
                loss = loss + config.grounding_weight * losses["grounding"]
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), config.grad_clip)
        optimizer.step()
        schedule.step()
        for ema, model in zip(emas, (unet, text_encoder), strict=False):
            ema.update(accelerator.unwrap_model(model))
        return {name: value.item() for name, value in losses.items()}

    started = time.monotonic()
    unet.train()
    text_encoder.train()
    steps = run_stage(step, start, config=config, accelerator=accelerator, desc="teacher", show=show)
    say(f"saving the pipeline to {out}")
    unet, text_encoder = (accelerator.unwrap_model(m).eval() for m in (unet, text_encoder))
    for ema, model in zip(emas, (unet, text_encoder), strict=False):
        ema.copy_to(model)
    if accelerator.is_main_process:
        save_pipeline(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
        metrics = {"steps": steps, "resumed_from": start.step, "seconds": round(time.monotonic() - started, 1)}
        save_config(config, out / "train_config.json", metrics=metrics)
        clear_checkpoints(out)
    return out


class Grounding:
    """The teacher's grounding loss: its UNet's recording attention processors and the training scenes' regions."""

    def __init__(self, store: Any, masks: dict[int, torch.Tensor]):
        self.store, self.masks = store, masks

    @classmethod
    def start(cls, config: TeacherConfig, unet: Any, latent_size: int, say: Any) -> Grounding:
        from icdcli.training import grounding

        sides = [
            latent_size >> k for k in range(len(config.block_out_channels)) if latent_size >> k >= grounding.MIN_SIDE
        ]
        say(f"grounding loss (weight {config.grounding_weight}) on the {sides} cross-attention maps: region masks")
        train = scenes("train", config.train_scenes, seed=config.seed)
        return cls(grounding.install(unet), {side: grounding.region_masks(train, side) for side in sides})

    @staticmethod
    @contextmanager
    def recording(grounding: Grounding | None) -> Iterator[None]:
        if grounding is None:
            yield
            return
        grounding.store.maps.clear()
        grounding.store.recording = True
        try:
            yield
        finally:
            grounding.store.recording = False

    def loss(self, index: torch.Tensor, *, keep: torch.Tensor) -> torch.Tensor:
        from icdcli.training.grounding import grounding_loss

        masks = {side: masks[index] for side, masks in self.masks.items()}
        return grounding_loss(self.store.maps, masks, keep.to(self.store.maps[0].device))


def load_teacher(teacher_dir: str | Path) -> Any:
    """The teacher as a `StableDiffusionPipeline`, all parts frozen and in eval mode."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        teacher_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    for part in (pipeline.vae, pipeline.text_encoder, pipeline.unet):
        part.eval().requires_grad_(False)
    return pipeline


def with_updates(config: Any, **changes: Any) -> Any:
    return replace(config, **changes)
