"""A deterministic procedural scene language: one shape of one colour on a plain background.

Every scene renders to an RGB image and describes itself in a caption of a fixed grammar,
"a {colour} {shape} on a {colour} background", so a text-to-image model trained on it can be
checked exactly: the colours and the shape of a sample are measurable. Edits change one
attribute of a scene and `change_mask` says which pixels that touched, which is what editing
metrics need (the region that must change and the region that must stay).

Scenes come from seeded streams: the training split and the held-out split draw from different
streams of the same seed, and scene `i` of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "background")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
"""Each split is its own seed stream: numpy's SeedSequence keeps (seed, 0, i) and (seed, 1, i) apart."""

SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 0.35, 0.65
"""Shape extent as a fraction of the image side."""


@dataclass(frozen=True)
class Scene:
    """One shape on a background; geometry in fractions of the image side.

    `size` is the side of the box the shape fits in (a circle's diameter), `cx`, `cy` its centre,
    `rotation` radians (invisible on circles).
    """

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        for colour in (self.colour, self.background):
            if colour not in COLOURS:
                raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
        if self.colour == self.background:
            raise ValueError(f"shape and background share the colour {self.colour!r}")

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    def coverage(self, size: int = 32) -> np.ndarray:
        """Anti-aliased shape coverage in [0, 1], float32 HxW: rendered at 4x and box-downsampled."""
        fine = size * SUPERSAMPLE
        centres = (np.arange(fine, dtype=np.float64) + 0.5) / fine
        y, x = np.meshgrid(centres, centres, indexing="ij")
        inside = _inside(self.shape, x - self.cx, y - self.cy, self.size, self.rotation)
        return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)

    def render(self, size: int = 32) -> np.ndarray:
        """The scene as a uint8 HxWx3 RGB image."""
        alpha = self.coverage(size)[..., None]
        fg = np.asarray(COLOURS[self.colour], dtype=np.float32)
        bg = np.asarray(COLOURS[self.background], dtype=np.float32)
        return np.rint(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, size: float, rotation: float) -> np.ndarray:
    """Boolean mask of points (offsets from the shape's centre) inside the shape."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    half = size / 2
    if shape == "circle":
        return u**2 + v**2 <= half**2
    if shape == "square":
        # Equal area to the circle of the same size, so shape edits keep the object's mass.
        side_half = half * math.sqrt(math.pi) / 2
        return (np.abs(u) <= side_half) & (np.abs(v) <= side_half)
    # Equilateral triangle pointing up with side `size`, its height centred on (cx, cy). Each edge
    # lies at the inradius R/2 along the outward normal opposite a vertex.
    radius = size / math.sqrt(3.0)
    v = v - radius / 4
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        normal = math.pi / 2 + k * 2 * math.pi / 3
        inside &= math.cos(normal) * u + math.sin(normal) * v <= radius / 2
    return inside


def sample_scene(rng: np.random.Generator, max_rotation: float = 0.0) -> Scene:
    """A uniformly drawn scene that fits inside the image with a small margin."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    others = [c for c in names if c != colour]
    background = others[rng.integers(len(others))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    margin = size / 2 + 0.04
    cx, cy = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
    rotation = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 and shape != "circle" else 0.0
    return Scene(shape, colour, background, cx, cy, size, rotation)


def split_rng(split: str, index: int, *, seed: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def scene_at(split: str, index: int, *, seed: int = 0, max_rotation: float = 0.0) -> Scene:
    """Scene `index` of a split: the same scene for the same (split, index, seed), always."""
    return sample_scene(split_rng(split, index, seed=seed), max_rotation)


def scenes(split: str, count: int, *, seed: int = 0, start: int = 0, max_rotation: float = 0.0) -> list[Scene]:
    return [scene_at(split, i, seed=seed, max_rotation=max_rotation) for i in range(start, start + count)]


def edit_scene(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """The same scene with one attribute changed: the shape's colour, the shape, or the background."""
    names = list(COLOURS)
    if kind == "colour":
        options = [c for c in names if c not in (scene.colour, scene.background)]
        return replace(scene, colour=options[rng.integers(len(options))])
    if kind == "background":
        options = [c for c in names if c not in (scene.colour, scene.background)]
        return replace(scene, background=options[rng.integers(len(options))])
    if kind == "shape":
        options = [s for s in SHAPES if s != scene.shape]
        return replace(scene, shape=options[rng.integers(len(options))])
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def change_mask(source: Scene, target: Scene, *, size: int = 32) -> np.ndarray:
    """Pixels (bool HxW) whose rendered colour differs between two scenes."""
    return np.any(source.render(size) != target.render(size), axis=-1)


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    return sorted({"a", "on", "background", *COLOURS, *SHAPES})


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B)xCxHxW in [-1, 1] -> uint8 (B)xHxWx3."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


class SceneDataset(Dataset):
    """`count` scenes of a split as (image in [-1, 1] CxHxW, caption) pairs, rendered on access."""

    def __init__(
        self, split: str = "train", *, count: int = 50_000, size: int = 32, seed: int = 0, max_rotation: float = 0.0
    ):
        split_rng(split, 0, seed=seed)  # validates the split name
        self.split, self.count, self.size, self.seed, self.max_rotation = split, count, size, seed, max_rotation

    def __len__(self) -> int:
        return self.count

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return scene_at(self.split, index, seed=self.seed, max_rotation=self.max_rotation)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_tensor(scene.render(self.size)), scene.caption()


def render_batch(items: list[Scene], size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Scenes as a float Bx3xHxW tensor in [-1, 1] and their captions."""
    images = torch.stack([to_tensor(s.render(size)) for s in items])
    return images, [s.caption() for s in items]
