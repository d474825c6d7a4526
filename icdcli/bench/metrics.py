"""Image-similarity metrics on float images in [0, 1], shaped (B, C, H, W): MSE, PSNR, SSIM.

SSIM is scikit-image's `structural_similarity` (Wang et al. 2004, an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, averaged over the valid region and the
channels): one implementation, from a maintained library. MSE is written here because the
benchmarks need it over a mask, which the libraries do not offer; PSNR follows from it with one
convention everywhere: identical images score 100 dB, a finite number (JSON has no infinity).
"""

from __future__ import annotations

import torch

PSNR_CAP_DB = 100.0
BENCH_EXTRA = "pip install 'icd[bench]' (scikit-image)"


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image; with a (B, 1, H, W) mask, only over its pixels."""
    squared = (a.double() - b.double()) ** 2
    if mask is None:
        return squared.flatten(1).mean(1)
    weights = mask.double().expand_as(squared)
    return (squared * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, PSNR_CAP_DB for identical images."""
    error = mse(a, b, mask).clamp_min(data_range**2 * 10 ** (-PSNR_CAP_DB / 10))
    return 10.0 * torch.log10(data_range**2 / error)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per image (scikit-image's, Gaussian-weighted as in the SSIM paper)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise ImportError(f"SSIM needs scikit-image: {BENCH_EXTRA}") from None
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11x11 window needs images of at least 11 pixels a side, got {tuple(a.shape[-2:])}")
    first, second = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    scores = [
        structural_similarity(x, y, channel_axis=0, data_range=data_range, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for x, y in zip(first, second, strict=True)
    ]  # fmt: skip
    return torch.tensor(scores, dtype=torch.float64)
