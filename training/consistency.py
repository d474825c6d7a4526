"""Multi-boundary consistency distillation of iCD's forward and reverse models (paper section 3,
appendix A), as PEFT LoRA adapters on the guidance-distilled teacher.

Entry point:

    distill_consistency(config: ConsistencyConfig, guidance_dir, out_dir) -> Path

`guidance_dir` is the output of `distill_guidance` (a pipeline folder whose UNet takes w through
`timestep_cond`). `out_dir` receives the adapters in the released PEFT layout,
`forward-19-259-519-779.safetensors` and `reverse-259-519-779-999.safetensors` (the boundaries in
the name; keys `unet.base_model.model.<module>.lora_A.weight` / `lora_B.weight`; metadata
`lora_alpha` and `rank`), `icd_lora.json` (boundaries, tau, rank, alpha, guidance scales),
`losses.jsonl`, `train_config.json` (written last: the stage is finished) and `checkpoints/step-N/`
to resume from (`ConsistencyConfig.resume = "latest"` or a checkpoint folder).

One training step, for a batch of clean latents x0 and captions c:

- reverse consistency: t on the 50-step DDIM grid {19, 39, ..., 999}, s the reverse boundary
  below t (0 in the last segment), w from a discrete set of classical scales. The frozen teacher
  moves x_t down by k grid steps (one DDIM jump, never past s); the target is the student's own
  boundary prediction from that point under no_grad (the point itself once it reaches s). The
  student's prediction is the DDIM jump x_t -> x_s with its own eps; pseudo-Huber loss.
- forward consistency: the mirror image upward, t in {19, ..., 979}, s the forward boundary above
  t (999 in the last segment), w = 1.
- forward preservation (lambda 1.5): noise x0 to a boundary b, decode one segment b -> a with the
  reverse model (no_grad, w = 1; the last segment ends at the forward start 19, not 0), ask the
  forward model to return a -> b.
- reverse preservation (lambda 1.5): noise x0 to a, encode a -> b with the forward model
  (no_grad), ask the reverse model to return b -> a.

The forward and reverse adapters have separate optimizers; every model call goes through
accelerate, so the same code runs on several GPUs and in mixed precision.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.diffusion.denoiser import GUIDANCE_EMBEDDING_DIM, guidance_scale_embedding
from icdcli.diffusion.sampler import ddim_jump
from icdcli.diffusion.schedule import (
    CLEAN,
    NUM_TRAIN_TIMESTEPS,
    RELEASED_CONFIGS,
    NoiseSchedule,
    forward_pairs,
    validate_boundaries,
)
from icdcli.io.atomic import atomic_path
from icdcli.training.checkpoints import (
    latest_checkpoint as latest_checkpoint,  # re-exported: resume points of this stage
)
from icdcli.training.checkpoints import resolve_resume as resolve_resume
from icdcli.training.common import (
    PromptCache,
    announcer,
    build_latent_bank,
    huber_c,
    pseudo_huber,
    run_stage,
    save_config,
    setup_torch,
    stage_accelerator,
    start_stage,
    step_generator,
)
from icdcli.training.guidance import load_guided_unet
from icdcli.training.teacher import load_teacher

LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""The modules the released iCD adapters train (DESIGN.md); those absent from a UNet are skipped."""

LAST_TIMESTEP = NUM_TRAIN_TIMESTEPS - 1


@dataclass
class ConsistencyConfig:
    boundaries: str = "4step-tau0.8"
    forward_boundaries: tuple[int, ...] | None = None
    reverse_boundaries: tuple[int, ...] | None = None
    tau: float | None = None
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0)
    solver_steps: int = 50
    skip: int = 1
    rank: int = 32
    lora_alpha: float = 32.0
    forward_lr: float = 3e-4
    reverse_lr: float = 3e-4
    forward_preservation: float = 1.5
    reverse_preservation: float = 1.5
    huber_factor: float = 0.001
    grad_clip: float = 1.0
    train_scenes: int = 16_384
    batch_size: int = 32
    steps: int = 800
    time_budget_s: float | None = 1500.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    checkpoints_kept: int = 2
    resume: str | None = None
    seed: int = 0
    log_every: int = 10
    show_progress: bool = True
    tracker: str | None = None

    @classmethod
    def smoke(cls) -> ConsistencyConfig:
        return cls(
            rank=4,
            lora_alpha=4.0,
            forward_lr=2e-3,
            reverse_lr=2e-3,
            train_scenes=256,
            batch_size=4,
            steps=20,
            time_budget_s=None,
            checkpoint_every=10,
            log_every=3,
            show_progress=False,
        )

    def resolved_boundaries(self) -> tuple[tuple[int, ...], tuple[int, ...], float]:
        """(forward, reverse, tau): explicit boundaries if given, else the named released configuration."""
        named = RELEASED_CONFIGS.get(self.boundaries)
        forward = self.forward_boundaries or (named.forward if named else None)
        reverse = self.reverse_boundaries or (named.reverse if named else None)
        if forward is None or reverse is None:
            raise ValueError(
                f"unknown boundary configuration {self.boundaries!r}; expected one of "
                f"{sorted(RELEASED_CONFIGS)} or explicit forward/reverse boundaries"
            )
        validate_boundaries(forward, reverse)
        tau = self.tau if self.tau is not None else (named.tau if named else 1.0)
        return tuple(forward), tuple(reverse), tau


# ---- timesteps: pure functions -------------------------------------------------------------------


def solver_timesteps(num_steps: int = 50) -> list[int]:
    """The teacher solver's grid, ascending: 50 steps -> [19, 39, ..., 999]."""
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    return [(i + 1) * ratio - 1 for i in range(num_steps)]


def reverse_boundary(t: int, reverse_boundaries: tuple[int, ...]) -> int:
    """Where the reverse model jumps from t: the largest segment end strictly below t (0 at the bottom)."""
    ends = [CLEAN, *sorted(reverse_boundaries)[:-1]]
    return max(b for b in ends if b < t)


def forward_boundary(t: int, forward_boundaries: tuple[int, ...]) -> int:
    """Where the forward model jumps from t: the smallest segment end strictly above t (999 at the top)."""
    ends = [*sorted(forward_boundaries)[1:], LAST_TIMESTEP]
    return min(b for b in ends if b > t)


def teacher_move(t: int, boundary: int, stride: int) -> int:
    """The point the teacher's k-step move reaches: `stride` timesteps towards the boundary, never past it."""
    return max(t - stride, boundary) if boundary < t else min(t + stride, boundary)


def jump(x: torch.Tensor, eps: torch.Tensor, t: list[int], s: list[int], schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample DDIM jumps x_t -> x_s with the given eps; s == t returns x_t itself."""
    rows = [
        xi if ti == si else ddim_jump(xi, ei, ti, si, schedule)
        for xi, ei, ti, si in zip(x, eps.to(x.dtype), t, s, strict=True)
    ]
    return torch.stack(rows)


def noise_to(x0: torch.Tensor, noise: torch.Tensor, t: list[int], schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample q(x_t | x0)."""
    return torch.stack([schedule.add_noise(xi, ni, ti) for xi, ni, ti in zip(x0, noise, t, strict=True)])


# ---- models ----------------------------------------------------------------------------------------


def lora_targets(unet: torch.nn.Module, candidates: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    names = [name for name, _ in unet.named_modules()]
    return [target for target in candidates if any(n == target or n.endswith("." + target) for n in names)]


def lora_student(teacher: Any, rank: int, alpha: float, *, gradient_checkpointing: bool = False) -> Any:
    """A PEFT LoRA model over a frozen copy of `teacher`; it starts equal to the teacher (lora_B = 0)."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(teacher).requires_grad_(False)
    if gradient_checkpointing:
        base.enable_gradient_checkpointing()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(base), init_lora_weights=True)
    return get_peft_model(base, config)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights under the released key layout `unet.base_model.model.<module>.lora_X.weight`."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {f"unet.{key}": value.detach().float().cpu().contiguous() for key, value in state.items()}


def adapter_file_name(direction: str, boundaries: tuple[int, ...]) -> str:
    return f"{direction}-{'-'.join(str(b) for b in boundaries)}.safetensors"


def save_adapter(model: Any, path: str | Path, *, rank: int, alpha: float) -> Path:
    from safetensors.torch import save_file

    alpha_text = str(int(alpha)) if float(alpha).is_integer() else str(alpha)
    save_file(adapter_state(model), str(path), metadata={"lora_alpha": alpha_text, "rank": str(rank)})
    return Path(path)


def load_adapter(teacher: Any, path: str | Path) -> Any:
    """A LoRA model over a copy of `teacher` with the weights of a saved adapter file."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key.removeprefix("unet."): handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    model = lora_student(teacher, int(metadata["rank"]), float(metadata["lora_alpha"]))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: keys that match no LoRA module: {result.unexpected_keys[:5]}")
    return model.eval()


class GuidedEps:
    """Calls a guidance-distilled UNet (or a LoRA model over one) at per-sample timesteps and scales."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(
        self, model: Any, x: torch.Tensor, t: list[int], hidden: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        embedding = guidance_scale_embedding(w.float().cpu(), GUIDANCE_EMBEDDING_DIM).to(self.device)
        timesteps = torch.tensor(t, device=self.device, dtype=torch.long)
        return model(x, timesteps, encoder_hidden_states=hidden, timestep_cond=embedding).sample.float()


# ---- training --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Direction:
    """What tells the forward half of a training step from the reverse half.

    Args:
        name: `forward` or `reverse` (the loss log's keys).
        first_starts: how many grid timesteps a start t is drawn from (the forward model never starts at 999).
        guided: draw w from the configured scales (reverse) or keep w = 1 (forward).
        preservation: the weight of the preservation loss (0: not computed).
        returns_upward: the student undoes a move of the other model down a segment (forward: it brings
            the point back up from the segment's low end) or up a segment (reverse).
        boundaries: the boundaries that pick the target s of each start t.
    """

    name: str
    first_starts: int
    guided: bool
    preservation: float
    returns_upward: bool
    boundaries: tuple[int, ...]

    def boundary(self, t: int) -> int:
        return forward_boundary(t, self.boundaries) if self.name == "forward" else reverse_boundary(t, self.boundaries)


class ConsistencyLosses:
    """The two losses of a consistency step, around the frozen guided teacher."""

    def __init__(self, teacher: Any, *, device: torch.device, stride: int, huber: float) -> None:
        self.teacher = teacher
        self.device = device
        self.stride = stride
        self.huber = huber
        self.schedule = NoiseSchedule.stable_diffusion()
        self.eps = GuidedEps(device)

    def noised(self, x0: torch.Tensor, t: list[int], gen: torch.Generator) -> torch.Tensor:
        return noise_to(x0, torch.randn(x0.shape, generator=gen).to(self.device), t, self.schedule)

    def consistency(
        self,
        model: Any,
        x0: torch.Tensor,
        hidden: torch.Tensor,
        w: torch.Tensor,
        t: list[int],
        boundary: list[int],
        gen: torch.Generator,
    ) -> torch.Tensor:
        """The student's jump x_t -> x_s against its own jump from one teacher move further."""
        moved = [teacher_move(ti, si, self.stride) for ti, si in zip(t, boundary, strict=True)]
        x_t = self.noised(x0, t, gen)
        with torch.no_grad():
            x_moved = jump(x_t, self.eps(self.teacher, x_t, t, hidden, w), t, moved, self.schedule)
            target = jump(x_moved, self.eps(model, x_moved, moved, hidden, w), moved, boundary, self.schedule)
        prediction = jump(x_t, self.eps(model, x_t, t, hidden, w), t, boundary, self.schedule)
        return pseudo_huber(prediction, target, self.huber)

    def preservation(
        self,
        student: Any,
        frozen: Any,
        start: list[int],
        end: list[int],
        x0: torch.Tensor,
        hidden: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """The frozen model moves x_start -> x_end; the student must bring it back to x_start."""
        ones = torch.ones(x0.shape[0])
        x_start = self.noised(x0, start, gen)
        with torch.no_grad():
            x_end = jump(x_start, self.eps(frozen, x_start, start, hidden, ones), start, end, self.schedule)
        back = jump(x_end, self.eps(student, x_end, end, hidden, ones), end, start, self.schedule)
        return pseudo_huber(back, x_start, self.huber)


@dataclass
class StepData:
    """The shared inputs of one training step and the draws it makes, in a fixed order."""

    x0: torch.Tensor
    hidden: torch.Tensor
    gen: torch.Generator
    grid: list[int]
    scales: torch.Tensor
    segments: list[tuple[int, int]]

    def draw(self, count: int) -> list[int]:
        return torch.randint(count, (self.x0.shape[0],), generator=self.gen).tolist()


def direction_loss(
    losses: ConsistencyLosses, direction: Direction, *, student: Any, partner: Any, data: StepData
) -> tuple[torch.Tensor, dict[str, float]]:
    """One direction's weighted loss and its logged parts (the random draws in the released training's order)."""
    batch = data.x0.shape[0]
    t = [data.grid[i] for i in data.draw(direction.first_starts)]
    w = (
        data.scales[torch.randint(len(data.scales), (batch,), generator=data.gen)]
        if direction.guided
        else torch.ones(batch)
    )
    loss = losses.consistency(student, data.x0, data.hidden, w, t, [direction.boundary(ti) for ti in t], data.gen)
    logged = {direction.name: loss.item()}
    if direction.preservation <= 0:
        return loss, logged
    pairs = [data.segments[i] for i in data.draw(len(data.segments))]
    low, high = [a for a, _ in pairs], [b for _, b in pairs]
    start, end = (high, low) if direction.returns_upward else (low, high)
    kept = losses.preservation(student, partner, start, end, data.x0, data.hidden, data.gen)
    logged[f"{direction.name}_preservation"] = kept.item()
    return loss + direction.preservation * kept, logged


def directions(config: ConsistencyConfig, grid_size: int) -> tuple[Direction, Direction]:
    """(forward, reverse) as the configuration sets them."""
    forward_b, reverse_b, _ = config.resolved_boundaries()
    forward = Direction("forward", grid_size - 1, False, config.forward_preservation, True, forward_b)
    reverse = Direction("reverse", grid_size, True, config.reverse_preservation, False, reverse_b)
    return forward, reverse


def lora_students(config: ConsistencyConfig, teacher: Any, accelerator: Any) -> tuple[Any, Any, Any, Any]:
    """The forward and reverse LoRA models over `teacher` and their optimizers, prepared by accelerate."""
    models, optimizers = [], []
    for lr in (config.forward_lr, config.reverse_lr):
        model = lora_student(
            teacher, config.rank, config.lora_alpha, gradient_checkpointing=config.gradient_checkpointing
        )
        models.append(model)
        optimizers.append(
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        )
    return tuple(accelerator.prepare(*models, *optimizers))


def save_consistency_outputs(
    config: ConsistencyConfig, models: tuple[Any, Any], out: Path, *, guidance_dir: str | Path, metrics: dict[str, Any]
) -> None:
    """The two adapters under their released names, `icd_lora.json`, and `train_config.json` last."""
    forward_b, reverse_b, tau = config.resolved_boundaries()
    names = {"forward": adapter_file_name("forward", forward_b), "reverse": adapter_file_name("reverse", reverse_b)}
    for model, name in zip(models, names.values(), strict=True):
        save_adapter(model, out / name, rank=config.rank, alpha=config.lora_alpha)
    summary = {
        "forward_boundaries": list(forward_b),
        "reverse_boundaries": list(reverse_b),
        "tau": tau,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "guidance_scales": list(config.guidance_scales),
        **names,
    }
    with atomic_path(out / "icd_lora.json") as staging:
        staging.write_text(json.dumps(summary, indent=2) + "\n")
    save_config(config, out / "train_config.json", guidance_dir=str(guidance_dir), metrics=metrics)


def distill_consistency(config: ConsistencyConfig, guidance_dir: str | Path, out_dir: str | Path) -> Path:
    """Train the forward and reverse LoRA adapters; return `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    forward_b, _, _ = config.resolved_boundaries()
    setup_torch()
    torch.manual_seed(config.seed)
    accelerator = stage_accelerator(config, out)
    device = accelerator.device
    show = config.show_progress and accelerator.is_local_main_process
    say = announcer(show, "consistency")
    say(f"loading the guided teacher from {guidance_dir}; adding rank-{config.rank} LoRA adapters")

    pipeline = load_teacher(guidance_dir)
    teacher = load_guided_unet(guidance_dir).to(device)
    forward_model, reverse_model, forward_opt, reverse_opt = lora_students(config, teacher, accelerator)
    start = start_stage(accelerator, config, out, say)

    prompts = PromptCache(pipeline.tokenizer, pipeline.text_encoder.to(device))
    vae = pipeline.vae.to(device)
    say(f"encoding {config.train_scenes} training scenes to latents")
    bank = build_latent_bank(
        vae, "train", count=config.train_scenes, image_size=vae.config.sample_size, seed=config.seed
    )
    grid = solver_timesteps(config.solver_steps)
    stride = config.skip * (NUM_TRAIN_TIMESTEPS // config.solver_steps)
    losses = ConsistencyLosses(
        teacher, device=device, stride=stride, huber=huber_c(bank.mean[0].numel(), config.huber_factor)
    )
    scales = torch.tensor(config.guidance_scales, dtype=torch.float32)
    halves = list(
        zip(
            directions(config, len(grid)),
            (forward_model, reverse_model),
            (reverse_model, forward_model),
            (forward_opt, reverse_opt),
            strict=True,
        )
    )

    def step(index: int) -> dict[str, float]:
        gen = step_generator(config.seed, index, rank=accelerator.process_index)
        latents, captions = bank.sample(config.batch_size, gen)
        data = StepData(latents.to(device), prompts(captions).to(device), gen, grid, scales, forward_pairs(forward_b))
        logged: dict[str, float] = {}
        for direction, student, partner, optimizer in halves:
            with accelerator.autocast():
                total, parts = direction_loss(losses, direction, student=student, partner=partner, data=data)
            logged.update(parts)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(total)
            accelerator.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
        return logged

    started = time.monotonic()
    forward_model.train()
    reverse_model.train()
    steps = run_stage(step, start, config=config, accelerator=accelerator, desc="consistency", show=show)
    say(f"saving the adapters to {out}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = tuple(accelerator.unwrap_model(m).eval() for m in (forward_model, reverse_model))
        metrics = {"steps": steps, "resumed_from": start.step, "seconds": round(time.monotonic() - started, 1)}
        save_consistency_outputs(config, trained, out, guidance_dir=guidance_dir, metrics=metrics)
    return out
