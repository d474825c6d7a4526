import numpy as np
import pytest
import torch

from icdcli.metrics import mse, psnr, ssim


def _pair(seed=0, size=32):
    rng = np.random.default_rng(seed)
    a = rng.random((2, 3, size, size))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    return torch.from_numpy(a), torch.from_numpy(b)


def test_mse_and_psnr_known_values():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert mse(a, b).item() == pytest.approx(0.01)
    assert psnr(a, b).item() == pytest.approx(20.0)
    assert psnr(a, a).item() == pytest.approx(100.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    b[..., 2:, :] = 0.5  # only outside the mask
    assert mse(a, b, mask).item() == pytest.approx(0.01)


def test_ssim_matches_scikit_image():
    skimage = pytest.importorskip("skimage.metrics")
    a, b = _pair()
    ours = ssim(a, b)
    for index in range(2):
        reference = skimage.structural_similarity(
            a[index].numpy(), b[index].numpy(), channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        assert ours[index].item() == pytest.approx(reference, abs=1e-6)


def test_ssim_is_one_for_identical_and_lower_for_noisy():
    a, b = _pair(1)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert (ssim(a, b) < 0.99).all()
