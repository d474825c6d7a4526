"""Stable Diffusion's noise schedule and the multi-boundary timestep plans of iCD models.

Everything here is pure: tensors in, tensors out, no model state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
CLEAN = 0
"""Jumping to timestep 0 means landing on the clean sample (a = 1, s = 0)."""


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, *, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """alpha_bar_t of the `scaled_linear` schedule, float64, indexed by timestep."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@functools.cache
def _stable_diffusion_alpha_bar() -> torch.Tensor:
    """Computed once per process: every inversion and decoding asks for it."""
    return alphas_cumprod()


@dataclass(frozen=True)
class NoiseSchedule:
    """a_t = sqrt(alpha_bar_t) and s_t = sqrt(1 - alpha_bar_t), with t = 0 meaning the clean sample."""

    alpha_bar: torch.Tensor

    @classmethod
    def stable_diffusion(cls) -> NoiseSchedule:
        return cls(_stable_diffusion_alpha_bar())

    def signal(self, t: int) -> float:
        return 1.0 if t == CLEAN else float(self.alpha_bar[t].sqrt())

    def noise(self, t: int) -> float:
        return 0.0 if t == CLEAN else float((1.0 - self.alpha_bar[t]).sqrt())

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Sample q(x_t | x0) with the given noise."""
        return self.signal(t) * x0 + self.noise(t) * noise

    def first_timestep(self) -> NoiseSchedule:
        """This schedule with t = 0 read as the schedule's own first timestep (alpha_bar_0 = 0.99915), not as the
        clean sample: where an inversion starts at 0, as the cycle-consistency forward model does (its code noises
        the clean latent to timestep 0 and takes the first jump from there)."""
        return _FirstTimestep(self.alpha_bar)


@dataclass(frozen=True)
class _FirstTimestep(NoiseSchedule):
    def signal(self, t: int) -> float:
        return float(self.alpha_bar[t].sqrt())

    def noise(self, t: int) -> float:
        return float((1.0 - self.alpha_bar[t]).sqrt())


@dataclass(frozen=True)
class BoundaryConfig:
    """Segment boundaries that a pair of forward/reverse iCD models was trained with."""

    name: str
    forward: tuple[int, ...]
    reverse: tuple[int, ...]
    tau: float

    @property
    def num_steps(self) -> int:
        return len(self.reverse)


RELEASED_CONFIGS: dict[str, BoundaryConfig] = {
    cfg.name: cfg
    for cfg in (
        BoundaryConfig("4step-tau0.8", (19, 259, 519, 779), (259, 519, 779, 999), 0.8),
        BoundaryConfig("4step-tau0.7", (19, 249, 499, 699), (249, 499, 699, 999), 0.7),
        BoundaryConfig("3step-tau0.7", (19, 339, 699), (339, 699, 999), 0.7),
    )
}


def validate_boundaries(forward: tuple[int, ...] | list[int], reverse: tuple[int, ...] | list[int]) -> None:
    """Raise ValueError, naming the rule, unless forward/reverse boundaries describe the same segments: as many of
    each, strictly increasing, within 0..999, the reverse ending at 999 and the inner points shared (forward
    [19, 259, 519, 779] with reverse [259, 519, 779, 999]). The forward model may start at 0 (the cycle-consistency
    forward model does)."""
    fwd, rev = list(forward), list(reverse)
    top = NUM_TRAIN_TIMESTEPS - 1
    if not fwd or len(fwd) != len(rev):
        raise ValueError(f"forward {fwd} and reverse {rev} boundaries must be non-empty and of equal length")
    if fwd != sorted(set(fwd)) or rev != sorted(set(rev)):
        raise ValueError(f"boundaries must be strictly increasing: forward {fwd}, reverse {rev}")
    if fwd[0] < 0 or rev[0] <= 0 or rev[-1] > top:
        raise ValueError(f"boundaries must lie within 0..{top}: forward {fwd}, reverse {rev}")
    if rev[-1] != top:
        raise ValueError(f"the reverse boundaries must end at {top}, where decoding starts: reverse {rev}")
    if fwd[1:] != rev[:-1]:
        raise ValueError(f"forward {fwd} and reverse {rev} boundaries do not share their inner points")


def parse_boundaries(text: str) -> tuple[int, ...]:
    """`"0,259,519,779"` -> (0, 259, 519, 779); ValueError naming the rule for anything but a comma list of
    increasing timesteps within 0..999."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"{text!r} is not a comma list of timesteps (like 19,259,519,779)")
    values = tuple(int(part) for part in parts)
    if list(values) != sorted(set(values)) or values[-1] >= NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"{text!r}: boundaries must be strictly increasing timesteps within 0..{NUM_TRAIN_TIMESTEPS - 1}"
        )
    return values


def reverse_pairs(reverse_boundaries: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(t, s) jumps of a reverse model: from the top boundary down to the clean sample.

    [259, 519, 779, 999] -> [(999, 779), (779, 519), (519, 259), (259, 0)].
    """
    points = sorted(reverse_boundaries, reverse=True) + [CLEAN]
    return list(zip(points[:-1], points[1:], strict=True))


def forward_pairs(forward_boundaries: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(t, s) jumps of a forward model: from the first boundary up to t = 999.

    [19, 259, 519, 779] -> [(19, 259), (259, 519), (519, 779), (779, 999)].
    """
    points = sorted(forward_boundaries) + [NUM_TRAIN_TIMESTEPS - 1]
    return list(zip(points[:-1], points[1:], strict=True))


def ddim_timesteps(num_steps: int, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """Stable Diffusion's "leading" DDIM timesteps, ascending: 50 steps -> [1, 21, ..., 981]."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_timesteps}], got {num_steps}")
    stride = num_train_timesteps // num_steps
    return [i * stride + offset for i in range(num_steps)]


def is_guided(t: int, tau: float) -> bool:
    """Dynamic guidance: full scale at t <= tau * 1000, none above it."""
    return t <= tau * NUM_TRAIN_TIMESTEPS
