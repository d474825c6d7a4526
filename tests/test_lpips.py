"""icd's LPIPS-squeeze against the `lpips` package itself: same weights in, same distances out.

The package needs torchvision, whose wheel must match the installed torch build (a CUDA torchvision does not
import beside a CPU-only torch); where it does not import, the test is skipped and says why.
"""

from __future__ import annotations

import pytest
import torch


def _lpips_package():
    try:
        import lpips
    except Exception as error:  # torchvision of another torch build raises RuntimeError, not ImportError
        pytest.skip(f"the lpips package does not import here ({type(error).__name__}: {error})".splitlines()[0])
    return lpips


def test_lpips_squeeze_matches_the_lpips_package(tmp_path):
    lpips = _lpips_package()
    from icdcli.pie.networks import load_lpips, lpips_distance

    torch.manual_seed(0)
    # a random SqueezeNet backbone with the package's shipped v0.1 linear heads
    reference = lpips.LPIPS(pretrained=True, net="squeeze", pnet_rand=True, verbose=False).eval()
    path = tmp_path / "lpips-squeeze.pth"
    torch.save(reference.state_dict(), path)
    ours = load_lpips(path)

    generator = torch.Generator().manual_seed(1)
    for shape in ((4, 3, 64, 64), (2, 3, 96, 80)):
        a = torch.rand(shape, generator=generator) * 2 - 1
        noise = torch.randn(shape, generator=generator) * torch.linspace(0.02, 0.5, shape[0]).view(-1, 1, 1, 1)
        b = (a + noise).clamp(-1, 1)
        with torch.no_grad():
            expected = reference(a, b).reshape(-1).double()
        got = lpips_distance(ours, a, b).double()
        assert expected.min() > 0 and len(set(expected.tolist())) == shape[0]  # distinct, non-trivial scores
        assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got, expected)
    with torch.no_grad():
        same = reference(a, a).reshape(-1)
    assert torch.equal(lpips_distance(ours, a, a), same)  # both exactly zero for identical images
