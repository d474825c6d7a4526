"""The stages of every edit on a loaded model: its prompts encoded once, seeded noise, its rows inverted and
decoded, each UNet freed once its stage is over, and the seconds each stage took."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding
from icdcli.diffusion.recipe import SamplerSettings
from icdcli.diffusion.sampler import StepCallback, ddim_invert, ddim_sample, icd_decode, icd_encode
from icdcli.diffusion.schedule import CLEAN, NoiseSchedule
from icdcli.io.images import fit_size
from icdcli.models.api import EditModel


@dataclass
class Timings:
    """Seconds per stage, accumulated; `sync` (e.g. `torch.cuda.synchronize`) closes each stage, so that a stage
    ends when the device has finished its kernels, not when they were queued."""

    seconds: dict[str, float] = field(default_factory=dict)
    sync: Callable[[], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PromptTable:
    """Encoded prompts by text, one row each, with the negative prompt and size conditioning a batch shares."""

    rows: dict[str, PromptEmbedding]
    negative: PromptEmbedding | None = None
    time_ids: torch.Tensor | None = None

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The conditioning of `prompts`, row by row (each prompt encoded before, in `rows`)."""
        chosen = [self.rows[prompt] for prompt in prompts]
        hidden = torch.cat([row.hidden_states for row in chosen])
        pooled = None if chosen[0].pooled is None else torch.cat([row.pooled for row in chosen])  # type: ignore[misc]
        return Conditioning(PromptEmbedding(hidden, pooled), self.negative, self.time_ids)

    def merged(self, other: PromptTable) -> PromptTable:
        """This table and `other`'s rows; the negative and time ids where either has them."""
        negative = self.negative if other.negative is None else other.negative
        time_ids = self.time_ids if other.time_ids is None else other.time_ids
        return PromptTable({**self.rows, **other.rows}, negative, time_ids)


def encode_prompts(
    model: EditModel,
    prompts: list[str],
    size: tuple[int, int],
    *,
    with_negative: bool = False,
    known: PromptTable | None = None,
) -> PromptTable:
    """The prompts not in `known`, each encoded once, in one text-encoder call (a negative prompt when asked).

    Edits encode their sources in one call and their new targets in another, so a decode from a saved inversion
    (whose sources were encoded when it was made) sees the very tensors a whole edit does."""
    width, height = size
    new = [prompt for prompt in dict.fromkeys(prompts) if known is None or prompt not in known.rows]
    rows: dict[str, PromptEmbedding] = {}
    negative = time_ids = None
    if new:
        cond = model.conditioning(new, height, width, with_negative=with_negative)
        for index, prompt in enumerate(new):
            pooled = None if cond.prompt.pooled is None else cond.prompt.pooled[index : index + 1]
            rows[prompt] = PromptEmbedding(cond.prompt.hidden_states[index : index + 1], pooled)
        negative, time_ids = cond.negative, cond.time_ids
    elif with_negative:  # every prompt known: only the negative is new
        assert known is not None and known.rows, "a negative prompt goes with prompts"
        like = next(iter(known.rows.values()))
        if like.pooled is not None:  # SDXL's negative is zeros, as prompt_conditioning makes it
            negative = PromptEmbedding(torch.zeros_like(like.hidden_states[:1]), torch.zeros_like(like.pooled[:1]))
        else:  # the empty prompt, encoded alone as prompt_conditioning encodes it
            negative = model.encode_prompt("")
    table = PromptTable(rows, negative, time_ids)
    return table if known is None else known.merged(table)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator, so a seed means the same noise on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def working_size(model: EditModel, image: Image.Image) -> tuple[int, int]:
    return fit_size(image.width, image.height, native_size=model.info.native_size, multiple=model.info.size_multiple)


def stage_done(model: EditModel, role: str) -> None:
    """The `role` UNet's stage of an edit is over: a low-memory model frees its weights now (icdcli.models.memory)."""
    if model.low_memory:
        model.release(role)


def conditioning_at(model: EditModel, prompt: str | list[str], size: tuple[int, int], guidance: float) -> Conditioning:
    """The prompts' conditioning at the working `size`, with the negative prompt when `guidance` needs one."""
    width, height = size
    return model.conditioning(prompt, height, width, with_negative=model.needs_negative(guidance))


def recording(
    trajectory: dict[int, torch.Tensor] | None, x0: torch.Tensor, callback: StepCallback | None = None
) -> StepCallback | None:
    """`callback`, also keeping in `trajectory` (when given) the latents of each timestep an inversion lands on, and
    `x0` at 0: the inversion's own latents, which local blend can keep outside the edited region."""
    if trajectory is None:
        return callback
    trajectory[CLEAN] = x0

    def record(index: int, t: int, latents: torch.Tensor) -> None:
        trajectory[int(t)] = latents
        if callback is not None:
            callback(index, t, latents)

    return record


def trajectory_row(trajectory: dict[int, torch.Tensor], row: int) -> dict[int, torch.Tensor]:
    """One row's share (1, C, h, w) of a batch's inversion trajectory (`recording`)."""
    return {t: latents[row : row + 1] for t, latents in trajectory.items()}


def invert_rows(
    model: EditModel,
    x0: torch.Tensor,
    seeds: list[int],
    settings: SamplerSettings,
    cond: Conditioning,
    trajectory: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clean latents (B, C, h, w) -> their noise latents, each row's forward noise from its own seed.

    `trajectory`, when given, receives the latents of every timestep the inversion lands on, the clean ones at 0
    (what local blend keeps with `blend_keep="inversion"`)."""
    schedule = NoiseSchedule.stable_diffusion()
    record = recording(trajectory, x0)
    if settings.sampler == "ddim":
        return ddim_invert(model.teacher_denoiser, x0, cond, settings.ddim_steps, schedule, callback=record)
    noise = torch.cat([seeded_noise((1, *x0.shape[1:]), seed) for seed in seeds]).to(x0.device)
    latents = icd_encode(model.forward_denoiser, x0, cond, model.info.forward_boundaries, noise, schedule, record)
    stage_done(model, "forward")
    return latents


def decode_rows(
    model: EditModel,
    latents: torch.Tensor,
    cond: Conditioning,
    unguided: Conditioning | None,
    guidance: Any,
    tau: Any,
    settings: SamplerSettings,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Noise latents -> pixels through the reverse model's steps (or DDIM on the teacher), the steps above tau under
    `unguided` when given."""
    schedule = NoiseSchedule.stable_diffusion()
    if settings.sampler == "ddim":
        x0 = ddim_sample(
            model.teacher_denoiser, latents, cond, settings.ddim_steps, schedule, guidance, tau, unguided, callback
        )
    else:
        boundaries = model.info.reverse_boundaries
        x0 = icd_decode(model.reverse_denoiser, latents, cond, boundaries, guidance, tau, schedule, unguided, callback)
    stage_done(model, "teacher" if settings.sampler == "ddim" else "reverse")
    return model.decode_latents(x0)


def same_or_rows(values: list) -> Any:
    """One value for all rows when they share it (a float keeps a batch of one on the scalar path), else (B,)."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32)
