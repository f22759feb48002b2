"""Img2img (SDEdit) on every scheduler, spacing and strength: int(n·s) steps, run from the
picture's latents noised with q(x_t | x_0) at the first timestep they then denoise, that
timestep found by its position in the grid."""

import pytest
import torch
from conftest import SD_SCHEDULE, StandInUNet, stand_in_pipeline, tiny_pipeline

from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import SCHEDULERS, from_name, sigmas_from_alphas_cumprod

NAMES = list(SCHEDULERS)
SPACINGS = ("leading", "linspace", "trailing")
# Karras σ only exist for DPM-Solver++; on the cosine schedule its grid repeats timesteps
SWEEP = ([(name, {"timestep_spacing": spacing}) for name in NAMES for spacing in SPACINGS]
         + [("dpmpp_2m", {"use_karras_sigmas": True}),
            ("dpmpp_2m", {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"})])
STRENGTHS = (0.01, 0.02, 0.05, 0.1, 0.3, 0.6, 1.0)
WHOLE_RUNS = (13, 50, 100)       # step counts also run to the end at every strength


def alpha_bar_at_position(scheduler, i: int) -> torch.Tensor:
    """ᾱ of grid position i: from its σ for the σ-schedulers (ᾱ = 1/(σ²+1)), else ᾱ_t."""
    if getattr(scheduler, "sigmas", None) is not None:
        return 1 / (scheduler.sigmas[i].double() ** 2 + 1)
    return scheduler.alphas_cumprod[int(scheduler.timesteps[i])].double()


def alpha_bar_at_time(alphas_cumprod: torch.Tensor, t) -> float:
    """ᾱ at a timestep, fractional ones through σ interpolated linearly in t (Euler's grid)."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())
    t = float(t)
    lo = min(int(t), len(sigmas) - 2)
    sigma = sigmas[lo] + (t - lo) * (sigmas[lo + 1] - sigmas[lo])
    return 1 / (sigma ** 2 + 1)


def noised(x0, eps, alpha_bar):
    """q(x_t | x_0) = √ᾱ·x_0 + √(1−ᾱ)·ε (Ho et al. 2020, eq. 4)."""
    return (alpha_bar ** 0.5 * x0.double() + (1 - alpha_bar) ** 0.5 * eps.double()).float()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n, strength", [(10, 0.1), (10, 0.5), (25, 0.8)])
def test_img2img_noises_the_picture_at_the_first_timestep_it_denoises(name, n, strength):
    """The tiny pipeline with a stand-in U-Net that returns the known noise ε: exactly
    int(n·s) calls, and the first call's input is √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for that call's own t,
    x_0 the picture's latents (CompVis/stable-diffusion PR #533, invoke-ai/InvokeAI PR #1946).
    The previous grid point's ᾱ would give a visibly different input."""
    tiny = tiny_pipeline()
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = StandInUNet(tiny.unet.config, eps)
    scheduler = from_name(name, SD_SCHEDULE)
    pipe = StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, unet, scheduler)
    picture = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe("a red circle", image=picture, strength=strength, num_inference_steps=n,
         guidance_scale=1.0, seed=4, latents=eps, output_type="latent", progress=False)
    assert len(unet.calls) == int(n * strength)
    x0 = tiny.vae.encode_latents(picture[None], torch.Generator().manual_seed(4))
    first_input, t = unet.calls[0]
    expected = noised(x0, eps, alpha_bar_at_time(scheduler.alphas_cumprod, t))
    torch.testing.assert_close(first_input, expected, atol=1e-5, rtol=1e-5)
    grid = from_name(name, SD_SCHEDULE)
    grid.set_timesteps(n)
    start = n - int(n * strength)
    assert float(t) == float(grid.timesteps[start])
    one_earlier = noised(x0, eps, alpha_bar_at_time(scheduler.alphas_cumprod,
                                                    grid.timesteps[start - 1]))
    assert (first_input - one_earlier).abs().max() > 1e-2


@pytest.mark.parametrize("name, settings", SWEEP,
                         ids=[f"{n}-{'-'.join(f'{v}' for v in s.values())}" for n, s in SWEEP])
def test_img2img_sweep_runs_int_n_s_steps_from_the_right_start(name, settings):
    """n = 1 … 100 × strengths from 0.01 to 1: never raises, runs int(n·s) steps (none: nothing
    to denoise), and the first U-Net input is the picture's latents noised with the ᾱ of grid
    position n − int(n·s) (a position: on the cosine schedule with Karras σ, t = 999 fills the
    first five positions of 20, each with its own σ). Runs with at most 10 steps, and those of
    13, 50 and 100 steps, go on to the end of the grid."""
    pipe = stand_in_pipeline(from_name(name, SD_SCHEDULE, **settings))
    unet = pipe.unet
    picture = torch.full((1, 3, 8, 8), 0.5)
    x0 = pipe.vae.encode_latents(picture)
    eps = torch.full((1, 4, 1, 1), -1.0)
    for n in range(1, 101):
        grid = from_name(name, SD_SCHEDULE, **settings)
        grid.set_timesteps(n)
        for strength in STRENGTHS:
            steps, start = int(n * strength), n - int(n * strength)
            unet.calls.clear()
            states = pipe.denoising_steps("a", image=picture, strength=strength,
                                          num_inference_steps=n, guidance_scale=1.0,
                                          latents=eps, progress=False)
            if steps == 0:
                assert list(states) == [] and unet.calls == []
                continue
            first = next(states)
            assert first.num_steps == steps, (n, strength)
            first_input, t = unet.calls[0]
            assert float(t) == float(grid.timesteps[start])
            expected = noised(x0, eps, alpha_bar_at_position(grid, start))
            torch.testing.assert_close(first_input, expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=n, s=strength: f"{n}, {s}: {m}")
            if steps <= 10 or n in WHOLE_RUNS:
                last = ([first, *states])[-1]
                assert len(unet.calls) == steps and last.step == steps - 1
                assert float(last.timestep) == float(grid.timesteps[-1])
            states.close()


def test_a_strength_with_no_step_gives_the_picture_back_through_the_vae():
    """int(10·0.05) = 0: no U-Net call, and the picture is the VAE's decode of its own latents
    (sampled with the run's generator)."""
    tiny = tiny_pipeline()
    unet = StandInUNet(tiny.unet.config)
    pipe = StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, unet,
                                   tiny.scheduler)
    picture = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = pipe("a red circle", image=picture, strength=0.05, num_inference_steps=10, seed=4,
               output_type="pt", progress=False).images
    assert unet.calls == []
    latents = tiny.vae.encode_latents(picture[None], torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, tiny.decode(latents, "pt"), atol=0, rtol=0)
