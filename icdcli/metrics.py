"""Image-similarity metrics on float images in [0, 1], shaped (B, C, H, W): MSE, PSNR, SSIM.

SSIM follows Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
computed per channel over the valid region and averaged: the same definition as scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image; with a (B, 1, H, W) mask, only over its pixels."""
    squared = (a.double() - b.double()) ** 2
    if mask is None:
        return squared.flatten(1).mean(1)
    weights = mask.double().expand_as(squared)
    return (squared * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (capped at 100 dB for identical images)."""
    error = mse(a, b, mask).clamp_min(data_range**2 * 1e-10)
    return 10.0 * torch.log10(data_range**2 / error)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return kernel[:, None] * kernel[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11) -> torch.Tensor:
    """Mean structural similarity per image."""
    a, b = a.double(), b.double()
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    kernel = _gaussian_window(size, 1.5 * size / window).to(a.device)[None, None].repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return score.flatten(1).mean(1)
