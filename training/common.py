"""Pieces every training stage shares: loss logs, the step loop, latent banks, prompt caches.

Batches are drawn from a generator seeded by (seed, step), so a resumed run sees the same data
as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .scenes import render_batch, scenes

LOG_NAME = "losses.jsonl"


def setup_torch() -> None:
    """Process-wide settings every stage wants.

    Flushing denormals matters on CPU: as weights and activations settle, float32 denormals appear
    and slow a training step down by up to 10x.
    """
    torch.set_flush_denormal(True)


def make_accelerator(mixed_precision: str = "no") -> Any:
    """An `accelerate.Accelerator`; stages in one process may each ask for their own precision.

    Accelerate keeps one process-wide state and refuses a second precision, so a state left by an
    earlier stage with another setting is reset (the distributed setup itself is kept).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The random stream of one training step on one process: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + rank * 1_000_000_007)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """LCM's pseudo-Huber loss sqrt(d^2 + c^2) - c, averaged."""
    return (torch.sqrt((prediction.float() - target.float()) ** 2 + c * c) - c).mean()


def huber_c(latent_numel: int, factor: float = 0.001) -> float:
    """The pseudo-Huber threshold scaled with the latent's dimension, c = factor * sqrt(dim)."""
    return factor * math.sqrt(latent_numel)


class LossLog:
    """Append-only JSON-lines log of losses, one record per logged step."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: round(float(v), 6) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def window_means(records: list[dict[str, float]], key: str, window: int) -> tuple[float, float]:
    """Mean of `key` over the first and over the last `window` records that have it."""
    values = [r[key] for r in records if key in r]
    if len(values) < 2:
        raise ValueError(f"need at least two logged values of {key!r}, found {len(values)}")
    window = max(1, min(window, len(values) // 2))
    return sum(values[:window]) / window, sum(values[-window:]) / window


class RunningMean:
    """Exponential moving averages of named losses, for the progress bar."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, losses: dict[str, float]) -> dict[str, float]:
        for key, value in losses.items():
            old = self.values.get(key)
            self.values[key] = value if old is None else self.decay * old + (1 - self.decay) * value
        return self.values


def run_steps(
    step_fn: Callable[[int], dict[str, float]],
    *,
    start_step: int,
    max_steps: int,
    log: LossLog,
    log_every: int = 10,
    time_budget_s: float | None = None,
    desc: str = "train",
    show_progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
) -> int:
    """Call `step_fn(step)` until `max_steps` steps or `time_budget_s` seconds; return the steps done.

    The losses `step_fn` returns are averaged over `log_every` steps into the log and shown as
    running means in a tqdm bar. `on_step_end(steps_done)` runs after every step (checkpoints).
    """
    from tqdm.auto import tqdm

    started = time.monotonic()
    running = RunningMean()
    pending: dict[str, list[float]] = {}
    step = start_step
    bar = tqdm(total=max_steps, initial=start_step, desc=desc, disable=not show_progress, dynamic_ncols=True)
    try:
        while step < max_steps:
            if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
                break
            losses = step_fn(step)
            step += 1
            for key, value in losses.items():
                pending.setdefault(key, []).append(value)
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.update(losses).items()}, refresh=False)
            bar.update(1)
            if step % log_every == 0 or step == max_steps:
                log.write(step, **{k: sum(v) / len(v) for k, v in pending.items()})
                pending.clear()
            if on_step_end is not None:
                on_step_end(step)
    finally:
        bar.close()
    if pending:
        log.write(step, **{k: sum(v) / len(v) for k, v in pending.items()})
    return step


class EMA:
    """An exponential moving average of a module's parameters with the usual warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.detach(), 1 - decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


@dataclass
class LatentBank:
    """VAE posteriors of a fixed set of scenes: sample latents (x scaling factor) and captions."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.captions)

    def sample(
        self, batch: int, generator: torch.Generator, posterior_sample: bool = True
    ) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(len(self), (batch,), generator=generator)
        latents = self.mean[index]
        if posterior_sample:
            latents = latents + self.std[index] * torch.randn(latents.shape, generator=generator)
        return latents * self.scaling_factor, [self.captions[i] for i in index.tolist()]


@torch.no_grad()
def encode_posteriors(vae: Any, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of images in [-1, 1]."""
    means, stds = [], []
    for chunk in images.split(batch):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def build_latent_bank(vae: Any, split: str, count: int, image_size: int, seed: int) -> LatentBank:
    images, captions = render_batch(scenes(split, count, seed), image_size)
    mean, std = encode_posteriors(vae, images)
    return LatentBank(mean, std, captions, float(vae.config.scaling_factor))


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Per-token hidden states of the text encoder's last layer, as Stable Diffusion 1.x uses them."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


class PromptCache:
    """Frozen-text-encoder embeddings of a closed caption language, computed once per caption."""

    def __init__(self, tokenizer: Any, text_encoder: Any):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            for prompt, embedding in zip(
                missing, encode_prompts(self.tokenizer, self.text_encoder, missing), strict=True
            ):
                self.cache[prompt] = embedding.float().cpu()
        return torch.stack([self.cache[p] for p in prompts])


def save_config(config: Any, path: str | Path, **extra: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**asdict(config), **extra}, indent=2, default=str) + "\n")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
