"""Chapter 1: the noise schedule and q(x_t | x_0), against diffusers and exact values."""

import pytest
import torch
from diffusers import DDPMScheduler

from minisd.noise import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr

SD_V1 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
CONFIGS = [
    {"beta_schedule": "linear"},
    SD_V1,
    {"beta_schedule": "squaredcos_cap_v2"},
    dict(SD_V1, rescale_betas_zero_snr=True),
    {"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.05, "beta_schedule": "linear"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_schedule_matches_diffusers(config):
    ours, ref = NoiseSchedule(**config), DDPMScheduler(**config)
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_add_noise_matches_diffusers(config):
    ours, ref = NoiseSchedule(**config), DDPMScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    T = ours.num_train_timesteps
    t = torch.tensor([0, 1, T // 2, T - 1])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t),
                               atol=1e-6, rtol=0)


def test_sd_v1_reference_values():
    s = NoiseSchedule(**SD_V1)
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert s.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=1e-6)
    sigma = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    assert sigma[999].item() == pytest.approx(14.6146, abs=1e-3)
    assert sigma[0].item() == pytest.approx(0.02917, abs=1e-4)
    torch.testing.assert_close(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))


def test_alphas_cumprod_prev_alignment():
    s = NoiseSchedule.from_betas([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504, 0.3024]))
    torch.testing.assert_close(s.alphas_cumprod_prev, torch.tensor([1.0, 0.9, 0.72, 0.504]))


def test_zero_terminal_snr():
    plain = NoiseSchedule(**SD_V1)
    rescaled = NoiseSchedule(**SD_V1, rescale_betas_zero_snr=True)
    assert plain.alphas_cumprod[999].item() == pytest.approx(0.00466, abs=1e-5)
    assert rescaled.alphas_cumprod[999].item() == 0.0
    assert rescaled.snr[999].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(),
                                                               abs=1e-7)
    assert (rescaled.alphas_cumprod[1:] <= rescaled.alphas_cumprod[:-1]).all()
    assert NoiseSchedule().rescale_betas_zero_snr is False


def test_rescale_does_not_modify_input():
    betas = make_betas(1000, **SD_V1)
    before = betas.clone()
    rescale_zero_terminal_snr(betas)
    assert torch.equal(betas, before)


def test_cosine_schedule_is_capped_and_ignores_beta_range():
    betas = make_betas(1000, 0.5, 0.6, "squaredcos_cap_v2")
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[0].item() < 1e-4


def test_add_noise_keeps_dtype_device_and_broadcasts_scalar_t():
    s = NoiseSchedule(**SD_V1)
    x0 = torch.randn(2, 4, 3, 5, dtype=torch.float16)
    noise = torch.randn_like(x0)
    out = s.add_noise(x0, noise, 500)
    assert out.dtype == torch.float16 and out.shape == x0.shape
    ac = s.alphas_cumprod[500].half()
    torch.testing.assert_close(out, ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    torch.testing.assert_close(s.add_noise(x0, noise, torch.tensor([500, 500])), out)
    whole = s.add_noise(x0.float(), noise.float(), torch.tensor([500.0, 500.0]))
    torch.testing.assert_close(whole, s.add_noise(x0.float(), noise.float(), 500))


def test_add_noise_closed_form_statistics():
    s = NoiseSchedule(**SD_V1)
    x0 = torch.full((1, 1, 256, 256), 0.5)
    g = torch.Generator().manual_seed(0)
    xt = s.add_noise(x0, torch.randn(x0.shape, generator=g), 300)
    ac = s.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx((ac.sqrt() * 0.5).item(), abs=0.01)
    assert xt.std().item() == pytest.approx((1 - ac).sqrt().item(), abs=0.01)


@pytest.mark.parametrize("t, message", [
    (1000, r"\[0, 999\]"),
    (-1, r"\[0, 999\]"),
    (torch.tensor([1.5, 2.0]), "whole numbers"),
    (torch.tensor([1, 2, 3]), r"shape \(2,\)"),
    (torch.tensor([[1], [2]]), r"shape \(2,\)"),
])
def test_add_noise_rejects_bad_timesteps(t, message):
    s = NoiseSchedule()
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=message):
        s.add_noise(x0, torch.zeros_like(x0), t)


def test_add_noise_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        NoiseSchedule().add_noise(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), 0)


def test_unknown_schedule_lists_known_ones():
    with pytest.raises(ValueError, match="cosine") as info:
        NoiseSchedule(beta_schedule="cosine")
    for name in BETA_SCHEDULES:
        assert name in str(info.value)


def test_from_config_reads_sd_v1_scheduler_config_and_ignores_extra_keys():
    config = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    s = NoiseSchedule.from_config(config)
    assert s.to_config() == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": False}


@pytest.mark.parametrize("config, message", [
    ({"beta_start": 0.02, "beta_end": 0.0001}, "beta_start ≤ beta_end"),
    ({"beta_start": -0.1}, "0 < beta_start"),
    ({"beta_end": 1.5}, "beta_end < 1"),
    ({"beta_start": "0.1"}, "beta_start='0.1'"),
    ({"num_train_timesteps": True}, "positive integer"),
    ({"num_train_timesteps": "abc"}, "positive integer"),
    ({"num_train_timesteps": None}, "positive integer"),
    ({"num_train_timesteps": 2.5}, "positive integer"),
    ({"num_train_timesteps": 1, "rescale_betas_zero_snr": True}, "at least 2 steps"),
])
def test_bad_schedule_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(**config)


@pytest.mark.parametrize("betas", [[], [[0.1, 0.2]], [0.5, 1.5], [0.0, 0.1]])
def test_from_betas_refuses_bad_values(betas):
    with pytest.raises(ValueError, match="betas must be"):
        NoiseSchedule.from_betas(betas)


def test_add_noise_refuses_integer_pictures_instead_of_rounding_alphas_to_zero():
    pixels = torch.full((2, 3), 200, dtype=torch.uint8)
    with pytest.raises(ValueError, match="float tensors.*127.5"):
        NoiseSchedule().add_noise(pixels, torch.zeros(2, 3, dtype=torch.uint8), 5)


def test_add_noise_returns_the_dtype_of_x0_whatever_the_noise_dtype():
    x0 = torch.zeros(2, 3, dtype=torch.float16)
    assert NoiseSchedule().add_noise(x0, torch.ones(2, 3), 5).dtype == torch.float16


def test_long_timestep_errors_stay_short():
    with pytest.raises(ValueError) as info:
        NoiseSchedule().add_noise(torch.zeros(5000, 1), torch.zeros(5000, 1), torch.full((5000,), 2000))
    assert len(str(info.value)) < 200 and "4992 more" in str(info.value)
