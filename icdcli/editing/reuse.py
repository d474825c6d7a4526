"""A photo inverted once, however many edits take it: the edits of a batch that share a photo, a source prompt and
a seed share one inversion, and an `InversionCache` carries inversions over to later batches (several targets of
one photo, a script's edits through `icd edit --jobs -`, repeated calls of the pipeline).

An inversion depends on the pixels at the working size, the source prompt, the seed and the sampler alone, so a
reused one is the one the edit would have made (up to the rounding of the batch it was made in, as for any edit of
a batch). Reuse skips the VAE encode and every forward-model call, and with `--low-memory` the reload of the
forward UNet.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from icdcli.diffusion.recipe import SamplerSettings
from icdcli.editing.stages import PromptTable, invert_rows, trajectory_row
from icdcli.io.images import image_to_tensor
from icdcli.models.api import EditModel

CACHE_BYTES = 128 * 2**20
"""What an `InversionCache` holds at most: the noise latents of about 2,000 SD1.5 photos at 512 px (fewer with
trajectories), a small part of any device's memory."""

InversionKey = tuple[str, tuple[int, ...], str, int, str, int]
"""(digest of the working-size pixels, their shape, source prompt, seed, sampler, DDIM steps)."""


@dataclass(frozen=True)
class Inverted:
    """One photo's noise latents (1, C, h, w) and, when it was recorded, its inversion's trajectory."""

    latents: torch.Tensor
    trajectory: dict[int, torch.Tensor] | None

    @property
    def nbytes(self) -> int:
        tensors = [self.latents, *(self.trajectory or {}).values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class InversionCache:
    """The most recently used inversions of one model, up to `limit` bytes of tensors (on the model's device)."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.entries: OrderedDict[InversionKey, Inverted] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.lock = threading.Lock()  # a pipeline may be called from several threads

    def get(self, key: InversionKey, *, trajectory: bool) -> Inverted | None:
        """The inversion stored under `key` (one with its trajectory when `trajectory`), or None."""
        with self.lock:
            found = self.entries.get(key)
            if found is None or (trajectory and found.trajectory is None):
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: InversionKey, inverted: Inverted) -> None:
        size = inverted.nbytes
        if size > self.limit:
            return
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self.entries[key] = inverted
            self.nbytes += size
            while self.nbytes > self.limit:
                _, dropped = self.entries.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.nbytes = 0


_CACHES: weakref.WeakKeyDictionary[EditModel, InversionCache] = weakref.WeakKeyDictionary()


_CACHES_LOCK = threading.Lock()


def model_inversions(model: EditModel) -> InversionCache:
    """The inversion cache that lives as long as `model` (the pipeline's, across its calls)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(model)
        if cache is None:
            cache = _CACHES[model] = InversionCache()
        return cache


def inversion_key(pixels: torch.Tensor, source: str, seed: int, settings: SamplerSettings) -> InversionKey:
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest()
    return digest, tuple(pixels.shape), source, seed, settings.sampler, settings.ddim_steps


def inverted_rows(
    model: EditModel,
    images: list,
    sources: list[str],
    seeds: list[int],
    size: tuple[int, int],
    settings: SamplerSettings,
    prompts: PromptTable,
    *,
    trajectory: bool,
    cache: InversionCache | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
    """The noise latents (B, C, h, w) of each row's image under its source prompt and seed, and with `trajectory`
    the latents of each timestep its inversion landed on (`invert_rows`).

    Rows that share pixels, source and seed are inverted once, in one batch with the other new ones; rows found in
    `cache` are not inverted at all, and the new ones are stored there. `prompts` holds every source's encoding."""
    pixels = [image_to_tensor(image, size) for image in images]
    given = zip(pixels, sources, seeds, strict=True)
    keys = [inversion_key(row, source, seed, settings) for row, source, seed in given]
    found: dict[InversionKey, Inverted] = {}
    if cache is not None:
        for key in dict.fromkeys(keys):
            hit = cache.get(key, trajectory=trajectory)
            if hit is not None:
                found[key] = hit
    first: dict[InversionKey, int] = {}  # each key not found, at the first row that has it
    for row, key in enumerate(keys):
        if key not in found:
            first.setdefault(key, row)
    new = list(first.values())
    if new:
        steps: dict[int, torch.Tensor] | None = {} if trajectory else None
        x0 = model.encode_image(torch.cat([pixels[row] for row in new]))
        cond = prompts.conditioning([sources[row] for row in new])
        latents = invert_rows(model, x0, [seeds[row] for row in new], settings, cond, steps)
        for place, row in enumerate(new):
            row_steps = None if steps is None else {t: x.clone() for t, x in trajectory_row(steps, place).items()}
            inverted = Inverted(latents[place : place + 1].clone(), row_steps)  # not a view that holds the batch
            found[keys[row]] = inverted
            if cache is not None:
                cache.put(keys[row], inverted)
    rows = [found[key] for key in keys]
    latents = torch.cat([row.latents for row in rows])
    if not trajectory:
        return latents, None
    timesteps = rows[0].trajectory or {}
    return latents, {t: torch.cat([row.trajectory[t] for row in rows]) for t in timesteps}  # type: ignore[index]
