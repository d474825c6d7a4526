"""One step's attention control: the tensors every P2P attention layer reads at that step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SELF_REPLACE_MAX_QUERIES = 32 * 32


@dataclass(frozen=True, eq=False)
class StepControl:
    """What the attention processors read at one step (tensors: they are graph inputs when exported).

    `cross_alpha` (L,): weight of the edited cross-attention map per target token (0 outside the
    cross-replace steps); `refine` (L,): 1 where the target token has a source token; `mapper`
    (L, L); `reweight` (L,); `self_replace` (1,): 1 within the self-replace steps. Cross-attention
    maps of `blend_queries` queries are the ones local blend reads: a controlled step returns them
    (see `icdcli.diffusion.denoiser.ControlledEps`).

    `cross_active` and `self_active` say (in Python, for PyTorch) whether the step edits cross- or
    self-attention at all; layers a step leaves alone then keep the fused SDPA kernel. An exported
    graph cannot branch on them: it leaves both True and computes every touched layer explicitly,
    which gives the same result with the flags' tensors at 0.

    Frozen: a control is an input of its step, never written to; compared by identity (it holds tensors).
    """

    cross_alpha: torch.Tensor
    refine: torch.Tensor
    mapper: torch.Tensor
    reweight: torch.Tensor
    self_replace: torch.Tensor
    blend_queries: int | None = None
    self_max_queries: int = SELF_REPLACE_MAX_QUERIES
    cross_active: bool = True
    self_active: bool = True

    def to(self, device: torch.device | str, dtype: torch.dtype) -> StepControl:
        return replace(
            self,
            cross_alpha=self.cross_alpha.to(device, dtype),
            refine=self.refine.to(device, dtype),
            mapper=self.mapper.to(device, dtype),
            reweight=self.reweight.to(device, dtype),
            self_replace=self.self_replace.to(device, dtype),
        )


def stack_controls(controls: list[StepControl]) -> StepControl:
    """One control for several pairs: each tensor stacked along a leading pair axis (see `edit_probabilities`).

    A layer runs explicitly when any pair needs it; pairs outside their steps get alpha 0 there, which
    leaves their target rows as they are.
    """
    blend = {c.blend_queries for c in controls if c.blend_queries is not None}
    if len(blend) > 1:
        raise ValueError(f"P2P edits of one batch must share a latent size (blend queries {sorted(blend)})")

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([getattr(c, name) for c in controls])

    return StepControl(
        cross_alpha=stacked("cross_alpha"),
        refine=stacked("refine"),
        mapper=stacked("mapper"),
        reweight=stacked("reweight"),
        self_replace=stacked("self_replace"),
        blend_queries=next(iter(blend), None),
        self_max_queries=controls[0].self_max_queries,
        cross_active=any(c.cross_active for c in controls),
        self_active=any(c.self_active for c in controls),
    )
