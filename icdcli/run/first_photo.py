"""The embedded model and a photo: it knows only 32 px scenes of one coloured shape on a plain background, so a
photo comes back as a smear of colour. `icd edit` says so once, before the edit, with what to use instead.

The decision is the image's own statistics, not its size (the bundled examples are scenes at 128 px): a scene is
two flat colours, so after a 32x32 box downsample and 8 levels per channel, its two most common colours cover
nearly all pixels (0.95 for `examples/red-circle.png`); a photo's, or noise's, cover a few percent.
"""

from __future__ import annotations

from typing import Any

SCENE_SHARE = 0.7  # the share of pixels the two most common colours of a scene cover at least


def two_colour_share(image: Any) -> float:
    """The share of the pixels of `image` (PIL) that its two most common colours cover, at 32x32 and 8 levels."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX)) // 32
    keys = (pixels[..., 0].astype(np.int64) * 64 + pixels[..., 1] * 8 + pixels[..., 2]).ravel()
    counts = np.sort(np.bincount(keys, minlength=512))[::-1]
    return float(counts[:2].sum()) / keys.size


def looks_like_a_scene(image: Any) -> bool:
    """Whether `image` is like the embedded model's training scenes (one shape on a plain background)."""
    return two_colour_share(image) >= SCENE_SHARE


def photo_note(fetch_commands: list[str]) -> str:
    """What to tell a user whose photo goes through the embedded model: why, what to use, how to fetch it."""
    lines = [
        "note: the embedded model knows only 32 px scenes of one coloured shape on a plain background "
        "(docs/default-model.md), so this image will come back as a smear of colour; for photos use a released "
        "model: --model sd15 (fetched from the Hugging Face hub on first use; without a network, fetch it where "
        "one exists and pass --model icd-sd15 --base icd-sd15/base):",
        *(f"  {command}" for command in fetch_commands),
    ]
    return "\n".join(lines)
