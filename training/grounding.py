"""A grounding loss on the teacher's cross-attention: each caption word's attention should fall on its region.

The scenes are synthetic, so every training caption's regions are known: the shape (its colour word and its
shape word) and the background (the background's colour word). Following TokenCompose's token loss (Wang et
al., CVPR 2024), for every cross-attention layer whose maps have at least `MIN_SIDE` cells a side, and for each of
those words, the loss is (1 - the share of the word's attention mass that lies in its region)^2, averaged over
words, layers and the captions that were not dropped for classifier-free guidance. A flat map scores the region's
share of the image; a map inside the region scores 0.

    GroundingAttnProcessor(store)    attention that records its cross-attention probabilities (with gradients)
    region_masks(scenes, side)       (N, 3, side, side): each scene's regions of its colour, shape, background word
    grounding_loss(maps, masks, positions, keep) -> scalar
"""

from __future__ import annotations

from typing import Any

import torch

from icdcli.training.scenes import Scene

MIN_SIDE = 8
WORD_POSITIONS = (2, 3, 6)
"""Token positions of the colour, shape and background-colour words in "a {colour} {shape} on a {colour}
background" under the word-level tokenizer (begin-of-text at 0)."""


class GroundingAttnProcessor:
    """Plain attention; a cross-attention layer of at least `MIN_SIDE`^2 queries also appends its head-averaged
    probabilities (B, Q, L) to `store` while `store.recording` is set."""

    def __init__(self, store: MapStore):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store, self.fused = store, AttnProcessor2_0()

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args, **kw
    ) -> torch.Tensor:
        queries = hidden_states.shape[1]
        if encoder_hidden_states is None or not self.store.recording or queries < MIN_SIDE**2:
            return self.fused(attn, hidden_states, encoder_hidden_states, *args, **kw)
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.store.maps.append(probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class MapStore:
    """The maps one UNet call recorded."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.recording = False


def install(unet: Any) -> MapStore:
    """Give every attention layer of `unet` a `GroundingAttnProcessor` sharing one store; returns the store."""
    store = MapStore()
    unet.set_attn_processor(GroundingAttnProcessor(store))
    return store


def region_masks(scenes: list[Scene], side: int) -> torch.Tensor:
    """(N, 3, side, side) float: the shape's coverage of each cell (colour and shape words) and its complement
    (the background's colour word)."""
    coverage = torch.stack([torch.from_numpy(scene.coverage(side)) for scene in scenes])
    return torch.stack([coverage, coverage, 1.0 - coverage], dim=1)


def grounding_loss(maps: list[torch.Tensor], masks: dict[int, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Mean of (1 - in-region share of each word's attention)^2 over layers, words and the kept captions.

    Args:
        maps: (B, Q, L) head-averaged cross-attention probabilities of each recorded layer.
        masks: (B, 3, side, side) region masks of the batch by map side.
        keep: (B,) bool, the captions that were not dropped.
    """
    losses = []
    for found in maps:
        side = int(round(found.shape[1] ** 0.5))
        words = found[:, :, list(WORD_POSITIONS)].transpose(1, 2)  # (B, 3, Q)
        region = masks[side].to(found.device, found.dtype).flatten(2)  # (B, 3, Q)
        share = (words * region).sum(-1) / words.sum(-1).clamp_min(1e-8)
        losses.append(((1.0 - share) ** 2)[keep].mean())
    return torch.stack(losses).mean()
