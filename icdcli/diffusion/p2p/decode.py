"""The sampler's view of a P2P decode: a denoiser wrapper and its step hook."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, Guidance, row_guidance, take_rows
from icdcli.diffusion.p2p.plan import ControlPlan


class P2PDenoiser:
    """A P2P decode as a plain denoiser over the rows (source 1, target 1, source 2, ...), so the one sampler loop
    that runs every other decode runs it too (`icdcli.diffusion.sampler.p2p_decode`), with `after_step` as its step
    hook.

    Each step the plan says whether anything still reads the source rows. While it does, the wrapped network runs
    every row under the step's control and the maps it returns go to the plan; `after_step` then applies local
    blend. From the first step after which nothing reads them, the network runs the target rows alone, without
    control (each row depends only on itself then: half the rows), the source rows' noise prediction is left at 0
    and `after_step` keeps the source rows where they were, so the source rows returned stop at that step.

    Args:
        network: what runs the UNet, with or without control.
        plan: the attention control of the decode.
        timesteps: the timestep each step evaluates at, in order (they name the step a call belongs to).
    """

    def __init__(self, network: ControlledDenoiser, plan: ControlPlan, timesteps: Sequence[int]):
        self.network, self.plan = network, plan
        self.steps = {t: index for index, t in enumerate(timesteps)}
        if len(self.steps) != len(timesteps):
            raise ValueError(f"P2P steps need distinct timesteps, got {list(timesteps)}")

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        index = self.steps[t]
        if self.plan.reads_source(index):
            step = self.network.controlled(x, t, cond, guidance, self.plan.step(index))
            self.plan.add_maps(step.maps)
            return step.eps
        targets = slice(1, None, 2)
        rows = row_guidance(guidance, x.shape[0])[targets] if isinstance(guidance, torch.Tensor) else guidance
        eps = self.network(x[targets], t, take_rows(cond, targets, x.shape[0]), rows)
        return torch.stack([torch.zeros_like(eps), eps], dim=1).reshape(x.shape)

    def after_step(self, index: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """The latents step `index + 1` starts from: local blend while the source rows are read, else the source
        rows as they were before the step and the target rows as it left them."""
        if self.plan.reads_source(index):
            return self.plan.blend(after, index)
        return torch.stack([before[0::2], after[1::2]], dim=1).reshape(after.shape)
