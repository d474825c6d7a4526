"""Guidance distillation: teach a copy of the teacher UNet to take the guidance scale as input.

Entry point:

    distill_guidance(config: GuidanceConfig, teacher_dir, out_dir) -> Path

The student is the teacher's UNet with `time_cond_proj_dim=512`, which adds
`time_embedding.cond_proj` (Linear(512, block_out_channels[0]), no bias). That layer starts at
zero, so before training the student equals the teacher at every w. It is trained so that
`unet(x_t, t, c, timestep_cond=guidance_scale_embedding(w))` matches the frozen teacher's real
classifier-free guidance eps_u + w (eps_c - eps_u), w ~ U[w_min, w_max] (classical scale).

`out_dir` receives `unet/` (config.json + diffusion_pytorch_model.safetensors: the full state dict,
the "teacher state dict" format of released guidance-distilled teachers, and its config), the
pipeline parts it needs beside it, `losses.jsonl`, `train_config.json` (written last: the stage is
finished) and, until it is, `checkpoints/step-N/` to resume from (`GuidanceConfig.resume = "latest"` or
a checkpoint folder). The folder loads as a `StableDiffusionPipeline` whose UNet is the guidance-distilled one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from icdcli.diffusion.denoiser import GUIDANCE_EMBEDDING_DIM, guidance_scale_embedding
from icdcli.diffusion.schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod
from icdcli.training.checkpoints import clear_checkpoints
from icdcli.training.common import (
    PromptCache,
    announcer,
    build_latent_bank,
    run_stage,
    save_config,
    setup_torch,
    stage_accelerator,
    start_stage,
    step_generator,
)
from icdcli.training.teacher import load_teacher, save_pipeline, warmup_lambda

COND_PROJ = "time_embedding.cond_proj.weight"


@dataclass
class GuidanceConfig:
    w_min: float = 1.0
    w_max: float = 12.0
    train_scenes: int = 16_384
    batch_size: int = 64
    steps: int = 800
    time_budget_s: float | None = 600.0
    lr: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 20
    show_progress: bool = True
    checkpoint_every: int = 100
    checkpoints_kept: int = 2
    resume: str | None = None
    tracker: str | None = None

    @classmethod
    def smoke(cls) -> GuidanceConfig:
        return cls(
            train_scenes=256,
            batch_size=8,
            steps=30,
            time_budget_s=None,
            lr=5e-4,
            warmup_steps=2,
            log_every=5,
            show_progress=False,
            checkpoint_every=10,
        )


def guided_student(teacher_unet: Any, embedding_dim: int = GUIDANCE_EMBEDDING_DIM) -> Any:
    """A copy of `teacher_unet` with a zero-initialised guidance projection."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    config["time_cond_proj_dim"] = embedding_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or missing != [COND_PROJ]:
        raise RuntimeError(f"teacher and student UNets differ beyond {COND_PROJ}: {missing=} {unexpected=}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def cfg_target(
    unet: Any, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Real classifier-free guidance of a plain UNet: eps_u + w (eps_c - eps_u), one batch of 2B."""
    eps = unet(torch.cat([noisy, noisy]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = eps.float().chunk(2)
    return eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)


def distill_guidance(config: GuidanceConfig, teacher_dir: str | Path, out_dir: str | Path) -> Path:
    """Train the guidance-distilled UNet from the teacher pipeline at `teacher_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch()
    torch.manual_seed(config.seed)
    accelerator = stage_accelerator(config, out)
    show = config.show_progress and accelerator.is_local_main_process
    say = announcer(show, "guidance")
    say(f"loading the teacher from {teacher_dir}")
    pipeline = load_teacher(teacher_dir)
    teacher = pipeline.unet.to(accelerator.device)
    student = guided_student(teacher).train()
    prompts = PromptCache(pipeline.tokenizer, pipeline.text_encoder)
    say(f"encoding {config.train_scenes} training scenes to latents")
    bank = build_latent_bank(
        pipeline.vae, "train", count=config.train_scenes, image_size=pipeline.vae.config.sample_size, seed=config.seed
    )
    alpha_bar = alphas_cumprod()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(schedule)
    start = start_stage(accelerator, config, out, say)
    device = accelerator.device

    def step(index: int) -> dict[str, float]:
        generator = step_generator(config.seed, index, rank=accelerator.process_index)
        latents, captions = bank.sample(config.batch_size, generator)
        batch = latents.shape[0]
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        w = config.w_min + (config.w_max - config.w_min) * torch.rand(batch, generator=generator)
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        noisy = (ab.sqrt() * latents + (1 - ab).sqrt() * torch.randn(latents.shape, generator=generator)).to(device)
        cond = prompts(captions).to(device)
        uncond = prompts([""] * batch).to(device)
        t, w = t.to(device), w.to(device)
        with torch.no_grad(), accelerator.autocast():
            target = cfg_target(teacher, noisy, t, cond, uncond, w)
        with accelerator.autocast():
            embedding = guidance_scale_embedding(w.cpu(), GUIDANCE_EMBEDDING_DIM).to(device)
            pred = student(noisy, t, encoder_hidden_states=cond, timestep_cond=embedding).sample
            loss = F.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    started = time.monotonic()
    steps = run_stage(step, start, config=config, accelerator=accelerator, desc="guidance", show=show)
    say(f"saving the guided pipeline to {out}")
    student = accelerator.unwrap_model(student).eval()
    if accelerator.is_main_process:
        save_pipeline(
            out, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=student
        )
        save_config(
            config,
            out / "train_config.json",
            teacher=str(teacher_dir),
            metrics={"steps": steps, "resumed_from": start.step, "seconds": round(time.monotonic() - started, 1)},
        )
        clear_checkpoints(out)  # finished: the saved pipeline is the result, resume points are dead weight
    return out


def load_guided_unet(guidance_dir: str | Path) -> Any:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(guidance_dir) / "unet")
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"{guidance_dir}: the UNet is not guidance-distilled (no time_cond_proj_dim)")
    return unet.eval().requires_grad_(False)
