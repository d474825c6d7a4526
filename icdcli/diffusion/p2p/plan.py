"""One P2P edit's plan (`P2PPlan`), several edits decoded as one batch (`P2PBatch`), and local blend."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from icdcli.diffusion.p2p.control import StepControl, stack_controls
from icdcli.diffusion.p2p.tokens import (
    prompt_token_ids,
    prompt_words,
    refinement_mapper,
    replacement_mapper,
    reweight_vector,
    word_indicator,
    word_token_positions,
)
from icdcli.diffusion.recipe import BLEND_THRESHOLD, REFINE, RELEASE_TAIL, REPLACE, P2PError, P2PSettings

# --- the step schedule ---------------------------------------------------------------------------


def cross_replace_steps(num_steps: int, fraction: float) -> list[bool]:
    """Steps whose cross-attention is replaced: [0, int((num_steps + 1) * fraction)).

    P2P keeps a table of num_steps + 1 rows of per-word weights and reads row i at step i, so with
    4 steps a fraction covers int(5 * fraction) of them (0.8 -> all 4, 0.4 -> the first 2).
    """
    active = int((num_steps + 1) * fraction)
    return [step < active for step in range(num_steps)]


def self_replace_steps(num_steps: int, fraction: float) -> list[bool]:
    """Steps whose self-attention is replaced: [0, int(num_steps * fraction))."""
    active = int(num_steps * fraction)
    return [step < active for step in range(num_steps)]


# --- the plan of one edit, and of a batch ---------------------------------------------------------


class ControlPlan(Protocol):
    """The attention control of a whole P2P decode: one edit's `P2PPlan`, or a `P2PBatch` of several."""

    def step(self, index: int) -> StepControl:
        """The control of step `index`."""
        ...

    def reads_source(self, index: int) -> bool:
        """Whether step `index` or a later one reads the source rows (attention control or local blend)."""
        ...

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate the blend-resolution cross-attention maps one controlled step returned."""
        ...

    def blend(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Local blend of the rows (source 1, target 1, ...) after step `index`, from the maps so far."""
        ...


@dataclass
class P2PPlan:
    """A whole P2P edit's control: per-step flags, token mapping, reweighting and local blend."""

    mode: str
    mapper: torch.Tensor
    refine: torch.Tensor
    reweight: torch.Tensor
    cross_steps: list[bool]
    self_steps: list[bool]
    blend_tokens: torch.Tensor | None  # (2, L): the blend words' tokens in the source and target prompts
    blend_size: int
    blend_threshold: float = BLEND_THRESHOLD
    map_sum: torch.Tensor | None = None
    kept: list[torch.Tensor | None] | None = None
    """Per step, the latents (1, C, h, w) the target keeps outside the blend region after it (the inversion's at the
    step's timestep, `keep_inversion`); None (or a step's None): the source branch's, P2P's rule."""
    _controls: dict[int, StepControl] = field(default_factory=dict, init=False, repr=False, compare=False)

    def step(self, index: int) -> StepControl:
        """The control of step `index`: one object per step for the whole edit (a device holds one copy of it)."""
        if index not in self._controls:
            self._controls[index] = self._make_step(index)
        return self._controls[index]

    def _make_step(self, index: int) -> StepControl:
        length = self.mapper.shape[0]
        cross = torch.full((length,), 1.0 if self.cross_steps[index] else 0.0)
        return StepControl(
            cross_alpha=cross,
            refine=self.refine,
            mapper=self.mapper,
            reweight=self.reweight,
            self_replace=torch.tensor([1.0 if self.self_steps[index] else 0.0]),
            blend_queries=self.blend_size**2 if self.blend_tokens is not None else None,
            cross_active=self.cross_steps[index],
            self_active=self.self_steps[index],
        )

    def reads_source(self, index: int) -> bool:
        """Whether step `index` or a later one reads the source branch: attention control or local blend."""
        return self.blend_tokens is not None or any(self.cross_steps[index:]) or any(self.self_steps[index:])

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate one step's blend-resolution cross-attention maps, (2, Q, L) each."""
        if not maps:
            return
        step_sum = torch.stack([m.float() for m in maps]).sum(0)
        self.map_sum = step_sum if self.map_sum is None else self.map_sum + step_sum.to(self.map_sum.device)

    def keep_inversion(self, trajectory: dict[int, torch.Tensor], landings: Sequence[int]) -> None:
        """Keep the inversion's latents outside the blend region: after the step landing at `landings[i]`, the
        target takes `trajectory[landings[i]]` there (a timestep the inversion did not pass keeps the source branch).
        """
        self.kept = [trajectory.get(int(s)) for s in landings]

    def blend(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Local blend of the two branches (source row 0, target row 1) after step `index`, from the maps so far."""
        if self.blend_tokens is None or self.map_sum is None:
            return x
        latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        if self.blend_tokens.device != self.map_sum.device:  # moved once per edit, not at every step
            self.blend_tokens = self.blend_tokens.to(self.map_sum.device)
        mask = blend_mask(
            self.map_sum, self.blend_tokens, size=self.blend_size, latent_hw=latent_hw, threshold=self.blend_threshold
        )
        kept = self.kept[index] if self.kept is not None else None
        return local_blend(x, mask.to(x.device, x.dtype), None if kept is None else kept.to(x.device, x.dtype))


@dataclass
class P2PBatch:
    """The plans of several P2P edits decoded as one batch: rows (source 1, target 1, source 2, target 2, ...).

    Each step stacks the plans' controls along a pair axis; the maps a step collects are split back per
    plan, and local blend runs per pair, so an edit's control never depends on the others in its batch.
    """

    plans: list[P2PPlan]
    _controls: dict[int, StepControl] = field(default_factory=dict, init=False, repr=False, compare=False)

    def step(self, index: int) -> StepControl:
        if len(self.plans) == 1:
            return self.plans[0].step(index)
        if index not in self._controls:
            self._controls[index] = stack_controls([plan.step(index) for plan in self.plans])
        return self._controls[index]

    def reads_source(self, index: int) -> bool:
        return any(plan.reads_source(index) for plan in self.plans)

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate one step's maps, (2P, Q, L) each, into each plan's (2, Q, L) share."""
        for pair, plan in enumerate(self.plans):
            plan.add_maps([m[2 * pair : 2 * pair + 2] for m in maps])

    def blend(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if len(self.plans) == 1:
            return self.plans[0].blend(x, index)
        return torch.cat([plan.blend(x[2 * pair : 2 * pair + 2], index) for pair, plan in enumerate(self.plans)])


# --- local blend ----------------------------------------------------------------------------------


def blend_mask(
    map_sum: torch.Tensor, tokens: torch.Tensor, *, size: int, latent_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """(1, 1, H, W) 0/1 mask: where either branch attends to its blend words above `threshold`.

    Each branch's word maps are summed, max-pooled 3x3, resized to the latents, divided by their
    maximum and thresholded; the mask is the union of the two branches'.
    """
    maps = (map_sum.float() * tokens.to(map_sum.device)[:, None, :].float()).sum(-1)
    maps = maps.reshape(maps.shape[0], 1, size, size)
    maps = F.max_pool2d(maps, 3, stride=1, padding=1)
    maps = F.interpolate(maps, size=latent_hw)
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (maps > threshold).any(dim=0, keepdim=True).float()


def local_blend(x: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the target branch (row 1) equal to `kept` outside `mask`: the source branch (row 0) when None."""
    source, target = x[0:1], x[1:2]
    outside = source if kept is None else kept
    return torch.cat([source, outside + mask * (target - outside)])


def blend_resolution(latent_side: int) -> int:
    """Side of the cross-attention maps local blend reads: latent / 4 (16 for SD1.5 at 512 px, as the release's
    16x16 maps), but not below 16 where the UNet has such maps: below 16 a map cannot outline a shape at P2P's
    threshold after its 3x3 max-pool (docs/default-model.md, "Why the maps are flat"). Always a side the UNet's
    attention runs at (the latent side halved 0-2 times): the smallest of those of at least that, else the latents'
    own (8x8 latents read 8; 16x16 read 16; 32 read 16; 48, whose quarter 12 is below 16, read 24)."""
    wanted = max(16, latent_side // 4)
    for halvings in (2, 1):
        side, rest = divmod(latent_side, 2**halvings)
        if rest == 0 and side >= wanted:
            return side
    return latent_side


# --- making a plan --------------------------------------------------------------------------------


def resolve_mode(settings: P2PSettings, source: str, target: str) -> str:
    equal = len(prompt_words(source)) == len(prompt_words(target))
    if settings.mode == REPLACE and not equal:
        raise P2PError(
            f"replace needs prompts with equal word counts ({len(prompt_words(source))} vs "
            f"{len(prompt_words(target))}): use --p2p-mode refine or auto"
        )
    if settings.mode == "auto":
        return REPLACE if equal else REFINE
    return settings.mode


def _blend_tokens(tokenizer: Any, source: str, target: str, settings: P2PSettings) -> torch.Tensor | None:
    """(2, L) the blend words' tokens in the source and target prompts, or None without local blend."""
    if not settings.blends:
        return None
    absent = [w for w in settings.blend if w not in prompt_words(source) and w not in prompt_words(target)]
    if absent:
        raise P2PError(f"--blend word {absent[0]!r} is in neither prompt ({source!r}, {target!r}); words match exactly")
    for flag, words, prompt in (
        ("--blend-src", settings.blend_source, source),
        ("--blend-tgt", settings.blend_target, target),
    ):
        missing = [w for w in words if w not in prompt_words(prompt)]
        if missing and settings.strict_blend:
            raise P2PError(
                f"{flag} word {missing[0]!r} is not a word of {prompt!r} (words match exactly: "
                f"{', '.join(prompt_words(prompt))})"
            )
        if missing:
            logging.getLogger("icd").warning(
                "local blend word %r is not a word of %r: it adds no region there", missing[0], prompt
            )
    tokens = torch.stack(
        [
            word_indicator(tokenizer, source, settings.blend + settings.blend_source),
            word_indicator(tokenizer, target, settings.blend + settings.blend_target),
        ]
    )
    if not tokens.any():
        logging.getLogger("icd").warning("local blend found none of its words: the edit keeps the source image")
    return tokens


def make_plan(
    tokenizer: Any, source: str, target: str, *, settings: P2PSettings, num_steps: int, latent_side: int
) -> P2PPlan:
    """The control of one P2P edit from `source` to `target` prompt over `num_steps` decoding steps.

    Args:
        tokenizer: The text encoder's tokenizer (its token positions index the attention maps).
        source: The source prompt.
        target: The target prompt.
        settings: The P2P settings (mode, replace fractions, blend words, reweighting).
        num_steps: The decoding steps the control spans.
        latent_side: The latent side the local blend's mask is sized from.
    """
    length = tokenizer.model_max_length
    mode = resolve_mode(settings, source, target)
    target_positions = word_token_positions(tokenizer, target)
    if mode == REPLACE:
        mapper = replacement_mapper(
            prompt_words(source),
            prompt_words(target),
            source_positions=word_token_positions(tokenizer, source),
            target_positions=target_positions,
            length=length,
            shift_tail=settings.replace_tail == RELEASE_TAIL,
        )
        refine = torch.ones(length)
    else:
        mapper, refine = refinement_mapper(
            prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, target), length=length
        )
    return P2PPlan(
        mode=mode,
        mapper=mapper,
        refine=refine,
        reweight=reweight_vector(
            tokenizer,
            source,
            target,
            amplify=settings.amplify,
            amplify_new=settings.amplify_new,
            positions=target_positions,
        ),
        cross_steps=cross_replace_steps(num_steps, settings.cross_replace),
        self_steps=self_replace_steps(num_steps, settings.self_replace),
        blend_tokens=_blend_tokens(tokenizer, source, target, settings),
        blend_size=blend_resolution(latent_side),
        blend_threshold=settings.blend_threshold,
    )
