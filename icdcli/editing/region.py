"""Edits held to a region the user paints: a mask image, white where the photo may change, black where it must not.

The decode keeps the latents outside the region on the inversion's own path (at every timestep the inversion landed
on, as local blend's `blend_keep="inversion"` does with a mask of attention maps), so the edited region grows out of
the photo's surroundings; the result then takes the photo's own pixels outside the region, through a feathered edge,
so what lies outside comes back exactly, not as the VAE redraws it. Grey parts of the mask change partly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from icdcli.diffusion.sampler import StepCallback

FEATHER_FRACTION = 1 / 128
"""The pixel composite's edge: a Gaussian blur of the mask of this part of the photo's longer side (4 px at 512)."""


def latent_mask(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) in [0, 1]: the mask averaged over each latent pixel's area, grown by one latent pixel, so that the
    latents of everything the mask touches are free to change (the pixel composite then draws the exact edge)."""
    height, width = latent_hw
    small = np.asarray(mask.convert("L").resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return F.max_pool2d(torch.from_numpy(small)[None, None], 3, stride=1, padding=1)


def keep_outside(x: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` inside the mask, `kept` outside it (a soft mask mixes them)."""
    return kept + mask * (x - kept)


@dataclass
class RegionKeeper:
    """A decode's step callback that keeps each masked row outside its mask on its inversion's latents.

    `masks[i]` (or None: the row edits freely) and `trajectories[i]` (the inversion's latents of that row by timestep,
    `icdcli.editing.stages.trajectory_row`) are per edit; edit i's latents are row `stride * i + offset` of the
    decode (prompt swap: stride 1; Prompt-to-Prompt: stride 2, offset 1, the target branch). A step that lands on a
    timestep the inversion did not pass is left as it is."""

    masks: list[torch.Tensor | None]
    trajectories: list[dict[int, torch.Tensor]]
    stride: int = 1
    offset: int = 0
    then: StepCallback | None = None

    def __call__(self, index: int, t: int, latents: torch.Tensor) -> None:
        for edit, (mask, trajectory) in enumerate(zip(self.masks, self.trajectories, strict=True)):
            kept = trajectory.get(int(t))
            if mask is None or kept is None:
                continue
            row = self.stride * edit + self.offset
            current = latents[row : row + 1]
            if mask.device != current.device or mask.dtype != current.dtype:  # moved once, not at every step
                self.masks[edit] = mask = mask.to(current.device, current.dtype)
            current.copy_(keep_outside(current, kept.to(current.device, current.dtype), mask))
        if self.then is not None:
            self.then(index, t, latents)


def feathered(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at `size` (width, height) with a soft edge (`FEATHER_FRACTION`), 8-bit grey."""
    resized = mask.convert("L").resize(size, Image.Resampling.BILINEAR)
    radius = max(size) * FEATHER_FRACTION
    return resized.filter(ImageFilter.GaussianBlur(radius)) if radius >= 0.5 else resized


def paste_outside(photo: Image.Image, edited: Image.Image, mask: Image.Image) -> Image.Image:
    """The edited image inside the mask and the photo's own pixels outside it, at the photo's size, through a
    feathered edge: where the mask is black the photo comes back exactly. Composited in 8 bits (PIL), so a large
    photo costs a few bytes a pixel, not float copies of it."""
    size = photo.size
    if edited.size != size:
        edited = edited.resize(size, Image.Resampling.LANCZOS)
    return Image.composite(edited.convert("RGB"), photo.convert("RGB"), feathered(mask, size))
