"""Samplers of iCD and of the DDIM baseline: short pure functions over a denoiser and a schedule.

Every step, in either direction, is a DDIM jump with the model's noise prediction. The iCD
samplers jump between the boundaries of the model's segments; the DDIM baseline walks Stable
Diffusion's evenly spaced timesteps with a teacher UNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, Denoiser, Guidance, mix_rows
from icdcli.diffusion.p2p.decode import P2PDenoiser
from icdcli.diffusion.p2p.plan import ControlPlan
from icdcli.diffusion.schedule import (
    CLEAN,
    NoiseSchedule,
    ddim_timesteps,
    forward_pairs,
    is_guided,
    reverse_pairs,
)

StepCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each step with (step index, timestep reached, latents)."""

StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""Called after each step's jump with (step index, latents before, latents after); returns the latents the next
step starts from (Prompt-to-Prompt's local blend and its source-branch cut, see
`icdcli.diffusion.p2p.decode.P2PDenoiser`)."""


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, t: int, s: int, schedule: NoiseSchedule) -> torch.Tensor:
    """Move x_t to x_s (s above or below t) along the DDIM trajectory of the predicted noise."""
    x0 = (x - schedule.noise(t) * eps) / schedule.signal(t)
    return schedule.signal(s) * x0 + schedule.noise(s) * eps


def step_guidance(t: int, guidance: Guidance, tau: Guidance) -> Guidance:
    """The dynamic-guidance step function: `guidance` at t <= tau * 1000, no guidance above.

    With a (B,) tensor of guidance or tau (a batch of edits, each its own), a (B,) tensor per row.
    """
    if not isinstance(guidance, torch.Tensor) and not isinstance(tau, torch.Tensor):
        return guidance if is_guided(t, tau) else 1.0
    guided = guided_rows(t, tau)
    scale = torch.as_tensor(guidance, dtype=torch.float32)
    return torch.where(guided, scale, torch.tensor(1.0)).float()


def guided_rows(t: int, tau: Guidance) -> torch.Tensor:
    """Whether each row is guided at t (a bool tensor; one element for a single tau)."""
    tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    return torch.tensor([is_guided(t, float(value)) for value in tau])


def step_conditioning(t: int, tau: Guidance, cond: Conditioning, unguided: Conditioning) -> Conditioning:
    """The prompt of each row at t: `cond` where it is guided, `unguided` (the source prompt) above its tau."""
    guided = guided_rows(t, tau)
    if bool(guided.all()) or unguided is cond:
        return cond
    if not bool(guided.any()):
        return unguided
    return mix_rows(guided, cond, unguided)


def _run_pairs(
    denoiser: Denoiser,
    x: torch.Tensor,
    pairs: list[tuple[int, int]],
    cond_at: Callable[[int], Conditioning],
    guidance_at: Callable[[int], Guidance],
    schedule: NoiseSchedule,
    callback: StepCallback | None,
    eval_at_target: bool = False,
    hook: StepHook | None = None,
) -> torch.Tensor:
    """The one sampler loop: a DDIM jump per (t, s) pair with the denoiser's eps, then the step hook, if any."""
    for index, (t, s) in enumerate(pairs):
        t_eval = s if eval_at_target else t
        eps = denoiser(x, t_eval, cond_at(t_eval), guidance_at(t_eval))
        stepped = ddim_jump(x, eps, t, s, schedule)
        x = stepped if hook is None else hook(index, x, stepped)
        if callback is not None:
            callback(index, s, x)
    return x


def icd_encode(
    forward: Denoiser,
    x0: torch.Tensor,
    cond: Conditioning,
    forward_boundaries: tuple[int, ...],
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Invert clean latents into x_999: noise them to the first forward boundary (t = 19 in the release), then
    unguided forward-model jumps.

    A forward model that starts at 0 (the cycle-consistency one) starts at the schedule's first timestep: the
    latents noised to alpha_bar_0 = 0.99915 and the first jump taken from there, as its code does; a jump *to* 0
    (decoding) still lands on the clean sample.
    """
    pairs = forward_pairs(forward_boundaries)
    start = pairs[0][0]
    if start != CLEAN:
        x = schedule.add_noise(x0, noise, start)
        return _run_pairs(forward, x, pairs, lambda t: cond, lambda t: 1.0, schedule, callback)
    first = schedule.first_timestep()
    x = first.add_noise(x0, noise, start)
    x = _run_pairs(forward, x, pairs[:1], lambda t: cond, lambda t: 1.0, first, callback)
    if len(pairs) == 1:
        return x

    def later(index: int, t: int, latents: torch.Tensor) -> None:
        if callback is not None:
            callback(index + 1, t, latents)

    return _run_pairs(forward, x, pairs[1:], lambda t: cond, lambda t: 1.0, schedule, later)


def icd_decode(
    reverse: Denoiser,
    x: torch.Tensor,
    cond: Conditioning,
    reverse_boundaries: tuple[int, ...],
    guidance: Guidance,
    tau: Guidance,
    schedule: NoiseSchedule,
    unguided_cond: Conditioning | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode x_999 to clean latents with reverse-model jumps under dynamic guidance.

    Steps above tau * 1000 run unguided with `unguided_cond` (the source prompt, when editing by
    prompt swap); the guided ones use `cond`. `guidance` and `tau` are one for the batch or (B,) tensors.
    """
    fallback = cond if unguided_cond is None else unguided_cond
    return _run_pairs(
        reverse,
        x,
        reverse_pairs(reverse_boundaries),
        lambda t: step_conditioning(t, tau, cond, fallback),
        lambda t: step_guidance(t, guidance, tau),
        schedule,
        callback,
    )


def ddim_invert(
    teacher: Denoiser,
    x0: torch.Tensor,
    cond: Conditioning,
    num_steps: int,
    schedule: NoiseSchedule,
    guidance: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM inversion from clean latents up to the last DDIM timestep (981 for 50 steps).

    Each jump evaluates the teacher at the timestep it moves to, with the latents it moves from:
    the usual approximation eps(x_s, s) ~ eps(x_t, s) of DDIM inversion.
    """
    timesteps = ddim_timesteps(num_steps)
    pairs = list(zip([CLEAN] + timesteps[:-1], timesteps, strict=True))
    return _run_pairs(teacher, x0, pairs, lambda t: cond, lambda t: guidance, schedule, callback, eval_at_target=True)


def ddim_sample(
    teacher: Denoiser,
    x: torch.Tensor,
    cond: Conditioning,
    num_steps: int,
    schedule: NoiseSchedule,
    guidance: Guidance = 1.0,
    tau: Guidance = 1.0,
    unguided_cond: Conditioning | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM sampling from the last DDIM timestep down to clean latents, with optional dynamic guidance."""
    timesteps = ddim_timesteps(num_steps)[::-1]
    pairs = list(zip(timesteps, timesteps[1:] + [CLEAN], strict=True))
    fallback = cond if unguided_cond is None else unguided_cond
    return _run_pairs(
        teacher,
        x,
        pairs,
        lambda t: step_conditioning(t, tau, cond, fallback),
        lambda t: step_guidance(t, guidance, tau),
        schedule,
        callback,
    )


def p2p_pairs(reverse_boundaries: tuple[int, ...] | None, ddim_steps: int | None) -> list[tuple[int, int]]:
    """The decoding steps of a P2P edit: the reverse model's boundary jumps, or DDIM's timesteps."""
    if reverse_boundaries is not None:
        return reverse_pairs(reverse_boundaries)
    if ddim_steps is None:
        raise ValueError("P2P decoding needs the reverse model's boundaries or a number of DDIM steps")
    timesteps = ddim_timesteps(ddim_steps)[::-1]
    return list(zip(timesteps, timesteps[1:] + [CLEAN], strict=True))


def pair_guidance(t: int, guidance: Guidance, tau: Guidance, pairs: int) -> torch.Tensor:
    """The guidance of the rows (source 1, target 1, source 2, ...) at t: 1 for the sources (they run unguided),
    dynamic guidance for the targets (`guidance`, `tau`: one for all or (P,) tensors)."""
    target = torch.as_tensor(step_guidance(t, guidance, tau), dtype=torch.float32).reshape(-1).expand(pairs)
    return torch.stack([torch.ones_like(target), target], dim=1).reshape(-1)


def p2p_decode(
    denoiser: ControlledDenoiser,
    x: torch.Tensor,
    cond: Conditioning,
    pairs: list[tuple[int, int]],
    guidance: Guidance,
    tau: Guidance,
    schedule: NoiseSchedule,
    plan: ControlPlan,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode latents (P, ...) into two branches each under Prompt-to-Prompt control; returns the rows
    (source 1, target 1, source 2, target 2, ...).

    `cond` holds the source and target prompts of each edit, interleaved (2P rows). Source branches run
    unguided, target branches under dynamic guidance (`guidance`, `tau`: one for all or (P,) tensors).
    The plan (an `icdcli.diffusion.p2p.plan.P2PPlan`, or a `P2PBatch` of P of them) gives each step's attention
    control, collects the cross-attention maps the controlled steps return and applies local blend, through the
    same loop as every other decode: `P2PDenoiser` is the denoiser, its `after_step` the step hook. From the
    first step after which nothing reads the source branches (no attention control, no local blend:
    `plan.reads_source`), only the target rows are decoded, without control: the source rows returned stop
    at that step. The caller has made `denoiser` ready for control (`install_control`).
    """
    p2p = P2PDenoiser(denoiser, plan, [t for t, _ in pairs])
    rows = x.repeat_interleave(2, dim=0)
    return _run_pairs(
        p2p,
        rows,
        pairs,
        lambda t: cond,
        lambda t: pair_guidance(t, guidance, tau, x.shape[0]),
        schedule,
        callback,
        hook=p2p.after_step,
    )
