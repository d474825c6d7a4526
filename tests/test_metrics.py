import numpy as np
import pytest
import torch

from icdcli.bench.metrics import mse, psnr, ssim


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


def test_ssim_of_flat_images_is_the_luminance_term():
    pytest.importorskip("skimage.metrics")
    # no variance: SSIM reduces to (2 x y + C1) / (x^2 + y^2 + C1) with C1 = (0.01 * range)^2
    x, y, c1 = 0.2, 0.6, 0.01**2
    flat = ssim(torch.full((1, 3, 16, 16), x, dtype=torch.float64), torch.full((1, 3, 16, 16), y, dtype=torch.float64))
    assert flat.item() == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-9)
    with pytest.raises(ValueError, match="11 pixels"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_ssim_is_one_for_identical_and_lower_for_noisy():
    pytest.importorskip("skimage.metrics")
    a, b = _pair(1)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert (ssim(a, b) < 0.99).all()
