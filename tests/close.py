"""Comparisons of float tensors with a tolerance relative to their magnitude.

Another CPU (other SIMD widths, other summation order) moves float32 results by a few ulps of the values
involved: about 1e-7 of their size per operation, more through a network. An absolute tolerance is right
for values near 1 only; these helpers scale it by the largest value compared.
"""

from __future__ import annotations

import torch


def scale_of(*tensors: torch.Tensor) -> float:
    """The magnitude of the values compared: the largest absolute value among them (at least 1e-12)."""
    return max([t.detach().abs().max().item() for t in tensors if t.numel()] + [1e-12])


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """`actual` equals `expected` within `rel` times their magnitude, everywhere."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = scale_of(actual, expected)
    worst = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert worst <= rel * scale, f"largest difference {worst:.3g} exceeds {rel:g} of the magnitude {scale:.3g}"


def close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> bool:
    """Whether `actual` equals `expected` within `rel` times their magnitude (for `not close_to_scale(...)`)."""
    worst = (actual.detach().double() - expected.detach().double()).abs().max().item()
    return worst <= rel * scale_of(actual, expected)
