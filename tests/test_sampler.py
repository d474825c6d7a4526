import pytest
import torch

from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding
from icdcli.diffusion.sampler import ddim_invert, ddim_jump, ddim_sample, icd_decode, icd_encode
from icdcli.diffusion.schedule import RELEASED_CONFIGS, NoiseSchedule


class AnalyticDenoiser:
    """Returns the exact noise that separates x_t from a known clean sample x0."""

    def __init__(self, x0, schedule):
        self.x0, self.schedule, self.calls = x0, schedule, []

    def __call__(self, x, t, cond, guidance=1.0):
        self.calls.append((t, guidance, cond))
        return (x - self.schedule.signal(t) * self.x0) / self.schedule.noise(t)


@pytest.fixture
def setup():
    schedule = NoiseSchedule.stable_diffusion()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    cond = Conditioning(PromptEmbedding(torch.zeros(1, 3, 5)))
    return schedule, x0, noise, cond


@pytest.mark.parametrize("name", sorted(RELEASED_CONFIGS))
def test_forward_then_reverse_reconstructs_exactly(setup, name):
    schedule, x0, noise, cond = setup
    config = RELEASED_CONFIGS[name]
    denoiser = AnalyticDenoiser(x0, schedule)
    latents = icd_encode(denoiser, x0, cond, config.forward, noise, schedule)
    # the true-noise model maps x_19 = a x0 + s n onto x_999 = a x0 + s n
    torch.testing.assert_close(latents, schedule.add_noise(x0, noise, 999), rtol=0, atol=1e-12)
    assert [t for t, _, _ in denoiser.calls] == list(config.forward)
    assert all(guidance == 1.0 for _, guidance, _ in denoiser.calls)
    decoded = icd_decode(denoiser, latents, cond, config.reverse, 7.0, config.tau, schedule)
    torch.testing.assert_close(decoded, x0, rtol=0, atol=1e-10)


def test_decode_uses_unguided_prompt_and_guidance_step_function(setup):
    schedule, x0, noise, cond = setup
    other = Conditioning(PromptEmbedding(torch.ones(1, 3, 5)))
    denoiser = AnalyticDenoiser(x0, schedule)
    icd_decode(denoiser, torch.randn_like(x0), cond, (259, 519, 779, 999), 19.0, 0.8, schedule, unguided_cond=other)
    assert [(t, w) for t, w, _ in denoiser.calls] == [(999, 1.0), (779, 19.0), (519, 19.0), (259, 19.0)]
    assert [c is other for _, _, c in denoiser.calls] == [True, False, False, False]


def test_ddim_inversion_and_sampling_with_true_noise(setup):
    schedule, x0, _, cond = setup
    denoiser = AnalyticDenoiser(x0, schedule)
    latents = ddim_invert(denoiser, x0, cond, 50, schedule)
    assert len(denoiser.calls) == 50 and denoiser.calls[0][0] == 1 and denoiser.calls[-1][0] == 981
    decoded = ddim_sample(denoiser, latents, cond, 50, schedule)
    assert [t for t, _, _ in denoiser.calls[50:]][:2] == [981, 961]
    torch.testing.assert_close(decoded, x0, rtol=0, atol=1e-10)


def test_ddim_jump_is_invertible_for_fixed_eps():
    schedule = NoiseSchedule.stable_diffusion()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    there = ddim_jump(x, eps, 259, 779, schedule)
    torch.testing.assert_close(ddim_jump(there, eps, 779, 259, schedule), x)
    clean = ddim_jump(x, eps, 259, 0, schedule)
    torch.testing.assert_close(clean, (x - schedule.noise(259) * eps) / schedule.signal(259))
