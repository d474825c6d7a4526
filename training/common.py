"""Pieces every training stage shares: loss logs, the step loop, resume, trackers, latent banks, prompt caches.

Batches are drawn from a generator seeded by (seed, step), so a resumed run sees the same data
as an uninterrupted one. A stage resumes from its latest checkpoint (training.checkpoints) with its
loss log cut back to that step, so the log never holds a step twice.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.io.atomic import atomic_path
from icdcli.training.checkpoints import Checkpointer, checkpoint_step, clear_checkpoints, resolve_resume
from icdcli.training.scenes import render_batch, scenes

LOG_NAME = "losses.jsonl"
LOGS = "logs"
"""Tracker folder beside the stages' folders: RUN/logs/<stage>/ (`tensorboard --logdir RUN/logs`)."""


def setup_torch() -> None:
    """Process-wide settings every stage wants.

    Flushing denormals matters on CPU: as weights and activations settle, float32 denormals appear
    and slow a training step down by up to 10x.
    """
    torch.set_flush_denormal(True)


def make_accelerator(
    mixed_precision: str = "no", *, tracker: str | None = None, logging_dir: str | Path | None = None
) -> Any:
    """An `accelerate.Accelerator`; stages in one process may each ask for their own precision.

    Accelerate keeps one process-wide state and refuses a second precision, so a state left by an
    earlier stage with another setting is reset (the distributed setup itself is kept). `tracker`
    (e.g. "tensorboard") is passed as `log_with`, writing under `logging_dir`.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
    if tracker is None:
        return Accelerator(mixed_precision=mixed_precision)
    return Accelerator(mixed_precision=mixed_precision, log_with=tracker, project_dir=str(logging_dir))


def tracker_config(config: Any) -> dict[str, int | float | str | bool]:
    """A stage config as tracker hyper-parameters: scalars kept, anything else (tuples, None) as text."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in asdict(config).items()
    }


def stage_accelerator(config: Any, out: Path) -> Any:
    """The accelerator of the stage writing `out`, its tracker (if any) logging to out/../logs/<out name>."""
    accelerator = make_accelerator(
        getattr(config, "mixed_precision", "no"), tracker=config.tracker, logging_dir=out.parent / LOGS
    )
    if config.tracker is not None:
        accelerator.init_trackers(out.name, config=tracker_config(config))
    return accelerator


def announcer(enabled: bool, stage: str) -> Callable[[str], None]:
    """`say(message)` printing "stage: message" on stderr (between progress bars), or nothing."""
    from tqdm.auto import tqdm

    def say(message: str) -> None:
        if enabled:
            tqdm.write(f"{stage}: {message}", file=sys.stderr)

    return say


def step_generator(seed: int, step: int, *, rank: int = 0) -> torch.Generator:
    """The random stream of one training step on one process: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + rank * 1_000_000_007)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """LCM's pseudo-Huber loss sqrt(d^2 + c^2) - c, averaged."""
    return (torch.sqrt((prediction.float() - target.float()) ** 2 + c * c) - c).mean()


def huber_c(latent_numel: int, factor: float = 0.001) -> float:
    """The pseudo-Huber threshold scaled with the latent's dimension, c = factor * sqrt(dim)."""
    return factor * math.sqrt(latent_numel)


class LossLog:
    """Append-only JSON-lines log of losses, one record per logged step, also sent to `tracker(values, step)`."""

    def __init__(
        self, path: str | Path, *, enabled: bool = True, tracker: Callable[[dict[str, float], int], None] | None = None
    ):
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = tracker
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **values: float) -> None:
        if self.tracker is not None:
            self.tracker({k: float(v) for k, v in values.items()}, step)
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: round(float(v), 6) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def records_until(lines: list[str], step: int) -> list[str]:
    """The log lines of steps up to `step`; a line cut short by a kill, and anything after it, is dropped."""
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


def cut_log(path: str | Path, step: int) -> None:
    """Rewrite a loss log (atomically) to its records up to `step`: a resumed stage logs each step once."""
    path = Path(path)
    if not path.exists():
        return
    kept = records_until(path.read_text().splitlines(), step)
    with atomic_path(path) as staging:
        staging.write_text("".join(line + "\n" for line in kept))


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a stage; it resumes from `checkpoint` (None: from its first step)."""

    def __init__(self, stage: str, step: int | None, checkpoint: Path | None):
        super().__init__(f"{stage} interrupted")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


class StopOnInterrupt:
    """While active, the first Ctrl-C only sets `requested` (the loop stops at the end of its step and
    saves); a second one raises KeyboardInterrupt at once. Outside the main thread Ctrl-C is left alone."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopOnInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


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
    checkpointer: Checkpointer | None = None,
) -> int:
    """Call `step_fn(step)` until `max_steps` steps or `time_budget_s` seconds; return the steps done.

    The losses `step_fn` returns are averaged over `log_every` steps into the log (and at every
    checkpoint, so that a resumed run's log misses no step) and shown as running means in a tqdm bar.
    `checkpointer` saves every `checkpointer.every` steps. Ctrl-C stops at the end of the current step,
    saves a checkpoint and raises TrainingInterrupted; a second Ctrl-C raises it at once with the last
    checkpoint saved.
    """
    from tqdm.auto import tqdm

    started = time.monotonic()
    running = RunningMean()
    pending: dict[str, list[float]] = {}
    step = start_step
    say = announcer(show_progress, desc)

    def flush() -> None:
        if pending:
            log.write(step, **{k: sum(v) / len(v) for k, v in pending.items()})
            pending.clear()

    bar = tqdm(total=max_steps, initial=start_step, desc=desc, disable=not show_progress, dynamic_ncols=True)
    with StopOnInterrupt(say) as interrupt:
        try:
            while step < max_steps:
                if checkpointer.agree(interrupt.requested) if checkpointer else interrupt.requested:
                    break
                if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
                    break
                losses = step_fn(step)
                step += 1
                for key, value in losses.items():
                    pending.setdefault(key, []).append(value)
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.update(losses).items()}, refresh=False)
                bar.update(1)
                due = checkpointer is not None and checkpointer.due(step)
                if step % log_every == 0 or step == max_steps or due:
                    flush()
                if due:
                    checkpointer.save(step)
        except KeyboardInterrupt as stop:  # a second Ctrl-C mid-step: the last checkpoint saved is the resume point
            raise TrainingInterrupted(desc, None, checkpointer.last if checkpointer else None) from stop
        finally:
            bar.close()
        flush()
        if interrupt.requested:
            raise TrainingInterrupted(desc, step, checkpointer.at(step) if checkpointer else None)
    return step


@dataclass
class StageStart:
    """Where a stage (re)starts: its first step, its checkpointer and its loss log."""

    step: int
    checkpointer: Checkpointer
    log: LossLog


def start_stage(accelerator: Any, config: Any, out: Path, say: Callable[[str], None]) -> StageStart:
    """Resume a stage from `config.resume` ("latest", a checkpoint folder) or start it from scratch.

    Call after `accelerator.prepare` and `register_for_checkpointing`. From scratch, old checkpoints
    go (so a later resume cannot pick one up) and the loss log is emptied; on resume the loss log is
    cut back to the checkpoint's step.
    """
    checkpoint = resolve_resume(config.resume, out)
    step = 0
    if checkpoint is None:
        if accelerator.is_main_process:
            clear_checkpoints(out)
    else:
        accelerator.load_state(str(checkpoint))
        step = checkpoint_step(checkpoint) or 0
        say(f"resuming from {checkpoint} (step {step} of {config.steps})")
    if accelerator.is_main_process:
        cut_log(out / LOG_NAME, step)
    accelerator.wait_for_everyone()
    tracker = None
    if config.tracker is not None:
        prefix = out.name

        def tracker(values: dict[str, float], at: int) -> None:
            accelerator.log({f"{prefix}/{k}": v for k, v in values.items()}, step=at)

    return StageStart(
        step,
        Checkpointer(accelerator, out, every=config.checkpoint_every, kept=config.checkpoints_kept, last=checkpoint),
        LossLog(out / LOG_NAME, enabled=accelerator.is_main_process, tracker=tracker),
    )


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

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (accelerate's `register_for_checkpointing` calls this)."""
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)  # in place: the shadow stays on its module's device
        self.updates = int(state["updates"])


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
        self, batch: int, generator: torch.Generator, *, posterior_sample: bool = True
    ) -> tuple[torch.Tensor, list[str]]:
        latents, captions, _ = self.sample_indexed(batch, generator, posterior_sample=posterior_sample)
        return latents, captions

    def sample_indexed(
        self, batch: int, generator: torch.Generator, *, posterior_sample: bool = True
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """`sample`, with the drawn scenes' indices too."""
        index = torch.randint(len(self), (batch,), generator=generator)
        latents = self.mean[index]
        if posterior_sample:
            latents = latents + self.std[index] * torch.randn(latents.shape, generator=generator)
        return latents * self.scaling_factor, [self.captions[i] for i in index.tolist()], index


@torch.no_grad()
def encode_posteriors(vae: Any, images: torch.Tensor, *, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of images in [-1, 1]."""
    means, stds = [], []
    for chunk in images.split(batch):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def build_latent_bank(vae: Any, split: str, *, count: int, image_size: int, seed: int) -> LatentBank:
    images, captions = render_batch(scenes(split, count, seed=seed), image_size)
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
    """Write a stage's `train_config.json` atomically: it marks the stage finished, so never half of it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging:
        staging.write_text(json.dumps({**asdict(config), **extra}, indent=2, default=str) + "\n")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_stage(
    step_fn: Callable[[int], dict[str, float]],
    start: StageStart,
    *,
    config: Any,
    accelerator: Any,
    desc: str,
    show: bool,
) -> int:
    """`run_steps` of one stage from its resume point, under its config's steps, logging and time budget;
    the stage's trackers are closed however it ends."""
    try:
        return run_steps(
            step_fn,
            start_step=start.step,
            max_steps=config.steps,
            log=start.log,
            log_every=config.log_every,
            time_budget_s=config.time_budget_s,
            desc=desc,
            show_progress=show,
            checkpointer=start.checkpointer,
        )
    finally:
        accelerator.end_training()
