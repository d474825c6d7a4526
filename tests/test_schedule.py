import pytest
import torch

from icdcli.diffusion.schedule import (
    RELEASED_CONFIGS,
    NoiseSchedule,
    alphas_cumprod,
    ddim_timesteps,
    forward_pairs,
    is_guided,
    reverse_pairs,
    validate_boundaries,
)


def test_alphas_match_stable_diffusion_scheduler():
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(alphas_cumprod().float(), reference, rtol=1e-6, atol=1e-7)


def test_clean_endpoint_has_unit_signal_and_no_noise():
    schedule = NoiseSchedule.stable_diffusion()
    assert (schedule.signal(0), schedule.noise(0)) == (1.0, 0.0)
    assert schedule.signal(999) ** 2 + schedule.noise(999) ** 2 == pytest.approx(1.0)
    assert schedule.signal(999) == pytest.approx(float(alphas_cumprod()[999].sqrt()))


@pytest.mark.parametrize(
    ("name", "expected_reverse", "expected_forward"),
    [
        (
            "4step-tau0.8",
            [(999, 779), (779, 519), (519, 259), (259, 0)],
            [(19, 259), (259, 519), (519, 779), (779, 999)],
        ),
        (
            "4step-tau0.7",
            [(999, 699), (699, 499), (499, 249), (249, 0)],
            [(19, 249), (249, 499), (499, 699), (699, 999)],
        ),
        ("3step-tau0.7", [(999, 699), (699, 339), (339, 0)], [(19, 339), (339, 699), (699, 999)]),
    ],
)
def test_boundary_pairing_of_released_configs(name, expected_reverse, expected_forward):
    config = RELEASED_CONFIGS[name]
    validate_boundaries(config.forward, config.reverse)
    assert reverse_pairs(config.reverse) == expected_reverse
    assert forward_pairs(config.forward) == expected_forward


@pytest.mark.parametrize(
    ("forward", "reverse"),
    [((19, 259), (259, 519, 999)), ((19, 300, 519), (259, 519, 999)), ((259, 19), (19, 999)), ((), ())],
)
def test_mismatched_boundaries_are_rejected(forward, reverse):
    with pytest.raises(ValueError):
        validate_boundaries(forward, reverse)


def test_dynamic_guidance_schedule():
    four = RELEASED_CONFIGS["4step-tau0.8"]
    assert [t for t, _ in reverse_pairs(four.reverse) if not is_guided(t, four.tau)] == [999]
    for name in ("4step-tau0.7", "3step-tau0.7"):
        config = RELEASED_CONFIGS[name]
        assert [is_guided(t, config.tau) for t, _ in reverse_pairs(config.reverse)] == [False] + [True] * (
            config.num_steps - 1
        )
    assert is_guided(800, 0.8) and not is_guided(801, 0.8)
    assert all(is_guided(t, 1.0) for t in range(1000))


def test_ddim_timesteps_match_diffusers_leading_spacing():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    for steps in (10, 50):
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(steps) == sorted(scheduler.timesteps.tolist())
    assert ddim_timesteps(50)[0] == 1 and ddim_timesteps(50)[-1] == 981
