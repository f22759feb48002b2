"""minisd.schedulers: parity with diffusers, exact values of the schedules, grids and steps, device parity, bad input."""

import json
import math
from dataclasses import fields

import diffusers
import pytest
import torch

from minisd import schedulers as S

diffusers.utils.logging.set_verbosity_error()
# diffusers' own np.array(tensor) calls warn under numpy 2; not about minisd
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# stable-diffusion-v1-5/scheduler/scheduler_config.json, as published.
SD_V1 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

REFERENCE = {
    S.DDPMScheduler: diffusers.DDPMScheduler,
    S.DDIMScheduler: diffusers.DDIMScheduler,
    S.EulerDiscreteScheduler: diffusers.EulerDiscreteScheduler,
    S.EulerAncestralDiscreteScheduler: diffusers.EulerAncestralDiscreteScheduler,
    S.DPMSolverMultistepScheduler: diffusers.DPMSolverMultistepScheduler,
}
CLASSES = list(REFERENCE)
SPACINGS = ("leading", "linspace", "trailing")
STEP_COUNTS = (1, 7, 10, 13, 25, 50, 1000)
TOL = 1e-5


def fake_model(x, t):
    """A deterministic stand-in for the U-Net: smooth, nonlinear in x, depends on t."""
    t = float(t)
    return 0.9 * math.cos(t / 700) * x + 0.1 * torch.sin(3 * x + t / 100)


def trajectory(scheduler, n, generator=None, model=fake_model, **step_kwargs):
    """Sample n steps from seeded noise; returns the lists of prev_sample and x̂_0."""
    scheduler.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x * scheduler.init_noise_sigma
    xs, x0s = [], []
    for t in scheduler.timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x,
                             generator=generator, **step_kwargs)
        x = out.prev_sample
        xs.append(x)
        x0s.append(getattr(out, "pred_original_sample", None))
    return xs, x0s


def assert_steps_close(ours, ref):
    """Every step within 1e-5 (plus 1e-6 relative: a few float32 ulps where |x| ~ 10–100)."""
    for step, (p, q) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(p, q, atol=TOL, rtol=1e-6,
                                   msg=lambda m, step=step: f"step {step}: {m}")


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_names_and_defaults_are_diffusers(cls):
    ours, ref = cls().config, REFERENCE[cls]().config
    for f in fields(ours):
        assert f.name in ref, f"{f.name} is not a key of diffusers' {cls.__name__}"
        assert getattr(ours, f.name) == ref[f.name], f.name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_sd_v1_config_loads_as_is(cls):
    s = cls.from_config(SD_V1)
    assert (s.config.beta_schedule, s.config.beta_start, s.config.steps_offset) == \
        ("scaled_linear", 0.00085, 1)
    assert s.config.rescale_betas_zero_snr is False          # off for SD v1
    ref = REFERENCE[cls].from_config(SD_V1)
    s.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(s.timesteps, ref.timesteps)


def test_sd_v1_config_keeps_set_alpha_to_one_false():
    """The configured value reaches every code path, and survives a save."""
    s = S.from_name("ddim", SD_V1)
    assert s.config.set_alpha_to_one is False
    assert s.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-7)
    assert S.DDIMScheduler.from_config(s.to_config()).config.set_alpha_to_one is False


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_and_load_scheduler_config(cls, tmp_path):
    s = cls(**SD, prediction_type="v_prediction", timestep_spacing="trailing")
    path = s.save_pretrained(tmp_path / "scheduler")
    assert path.name == "scheduler_config.json"
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == cls.__name__
    assert saved["prediction_type"] == "v_prediction"
    assert cls.from_pretrained(tmp_path / "scheduler").config == s.config
    assert cls.from_pretrained(path).config == s.config
    ref = REFERENCE[cls].from_pretrained(tmp_path / "scheduler")   # diffusers reads it too
    for key in ("beta_schedule", "prediction_type", "timestep_spacing", "beta_end"):
        assert ref.config[key] == saved[key]


def test_unknown_keys_ignored_unsupported_features_refused():
    s = S.DDIMScheduler.from_config({**SD_V1, "some_future_key": 3})
    assert s.config.beta_end == 0.012
    with pytest.raises(ValueError, match="thresholding=True"):
        S.DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        S.DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        S.EulerDiscreteScheduler.from_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        S.DDPMScheduler(variance_type="learned_range")
    # keys another scheduler has are ignored, as in diffusers
    assert S.DDIMScheduler.from_config({"use_karras_sigmas": True}).config.beta_start == 0.0001


def test_from_name_registry():
    assert S.SCHEDULERS == {
        "ddpm": S.DDPMScheduler, "ddim": S.DDIMScheduler, "euler": S.EulerDiscreteScheduler,
        "euler_ancestral": S.EulerAncestralDiscreteScheduler,
        "dpmpp_2m": S.DPMSolverMultistepScheduler}
    s = S.from_name("dpmpp_2m", SD_V1, use_karras_sigmas=True)
    assert isinstance(s, S.DPMSolverMultistepScheduler)
    assert s.config.use_karras_sigmas and s.config.beta_schedule == "scaled_linear"
    assert isinstance(S.from_name("euler"), S.EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*ddpm, ddim, euler, "
                                         "euler_ancestral, dpmpp_2m"):
        S.from_name("heun")


# ---------------------------------------------------------------- grids


def test_spacings_written_out():
    def grid(n, spacing, offset=0):
        s = S.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(n)
        return s.timesteps.tolist()

    assert grid(50, "leading", 1) == list(range(981, 0, -20))        # 981, 961, …, 21, 1
    assert grid(50, "leading", 0) == list(range(980, -1, -20))       # 980, …, 0
    assert grid(50, "linspace") == [
        999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673,
        652, 632, 612, 591, 571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326,
        306, 285, 265, 245, 224, 204, 183, 163, 143, 122, 102, 82, 61, 41, 20, 0]
    assert grid(50, "trailing") == list(range(999, 0, -20))          # 999, 979, …, 39, 19
    assert grid(10, "leading", 1) == list(range(901, 0, -100))       # 901, …, 1
    assert grid(10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert grid(10, "trailing") == list(range(999, 0, -100))         # 999, 899, …, 99


def test_every_grid_has_n_distinct_steps_in_range():
    for spacing in SPACINGS:
        for offset in (0, 1):
            for n in range(1, 1001):
                if spacing == "leading" and offset == 1 and n == 1000:
                    with pytest.raises(ValueError, match="outside the training range"):
                        S.spaced_timesteps(n, 1000, spacing, offset)
                    continue
                t = S.spaced_timesteps(n, 1000, spacing, offset).round()
                assert len(t) == n and t.min() >= 0 and t.max() <= 999
                assert (t[:-1] > t[1:]).all(), (spacing, offset, n)


def test_trailing_grid_has_n_steps_where_diffusers_has_n_plus_1():
    """diffusers' np.arange(1000, 0, -1000/61) has 62 entries (the last is -1)."""
    ours = S.DDIMScheduler(timestep_spacing="trailing")
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(61)
    ref.set_timesteps(61)
    assert len(ours.timesteps) == 61 and ours.timesteps.min() == 15
    assert torch.equal(ours.timesteps, ref.timesteps[:61])


GRID_CASES = [(cls, spacing, n, offset) for cls in CLASSES for spacing in SPACINGS
              for n in STEP_COUNTS for offset in (0, 1)]


@pytest.mark.parametrize("cls,spacing,n,offset", GRID_CASES,
                         ids=[f"{c.__name__}-{s}-{n}-off{o}" for c, s, n, o in GRID_CASES])
def test_timesteps_and_sigmas_match_diffusers(cls, spacing, n, offset):
    config = {**SD, "timestep_spacing": spacing, "steps_offset": offset}
    ours, ref = cls(**config), REFERENCE[cls](**config)
    ref.set_timesteps(n)
    try:
        ours.set_timesteps(n)
    except ValueError:
        # minisd refuses only where diffusers' grid is broken: off the range, or repeating
        t = ref.timesteps
        assert t.max() > 999 or len(set(t.tolist())) < n
        return
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if getattr(ours, "sigmas", None) is not None:
        assert torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_karras_sigmas_match_diffusers(n):
    ours = S.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    ref = diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas[0] == pytest.approx(14.6146, abs=1e-4)
    assert ours.sigmas[-1] == 0.0


# ---------------------------------------------------------------- trajectories

TRAJECTORY_CASES = []
for _pred in S.PREDICTION_TYPES:
    for _spacing in SPACINGS:
        for _n in (10, 25):
            for _extra in ({"clip_sample": False}, {}):
                TRAJECTORY_CASES.append((S.DDPMScheduler, _pred, _spacing, _n, _extra))
                if _spacing != "linspace":   # diffusers' DDIM leaves the linspace grid
                    TRAJECTORY_CASES.append((S.DDIMScheduler, _pred, _spacing, _n, _extra))
            TRAJECTORY_CASES.append((S.EulerDiscreteScheduler, _pred, _spacing, _n, {}))
            if _pred != "sample":            # diffusers has no sample prediction here
                TRAJECTORY_CASES.append(
                    (S.EulerAncestralDiscreteScheduler, _pred, _spacing, _n, {}))
            for _extra in ({}, {"use_karras_sigmas": True}, {"solver_order": 1}):
                TRAJECTORY_CASES.append(
                    (S.DPMSolverMultistepScheduler, _pred, _spacing, _n, _extra))


@pytest.mark.parametrize(
    "cls,pred,spacing,n,extra", TRAJECTORY_CASES,
    ids=[f"{c.__name__}-{p}-{s}-{n}-{'-'.join(e) or 'default'}"
         for c, p, s, n, e in TRAJECTORY_CASES])
def test_trajectory_matches_diffusers(cls, pred, spacing, n, extra):
    config = {**SD_V1, "prediction_type": pred, "timestep_spacing": spacing, **extra}
    ours = cls.from_config(config)
    ref = REFERENCE[cls].from_config(config)
    xs, x0s = trajectory(ours, n, torch.Generator().manual_seed(1))
    ref_xs, ref_x0s = trajectory(ref, n, torch.Generator().manual_seed(1))
    assert_steps_close(xs, ref_xs)
    if ref_x0s[0] is not None:
        assert_steps_close(x0s, ref_x0s)
    assert xs[-1].abs().max() < 20          # a sample, not an overflow


@pytest.mark.parametrize("spacing,n", [("linspace", 7), ("linspace", 13), ("linspace", 50),
                                       ("trailing", 7), ("trailing", 13), ("trailing", 30)])
@pytest.mark.parametrize("pred", S.PREDICTION_TYPES)
def test_ddim_off_diffusers_grids_matches_ddpm_posterior(spacing, n, pred):
    """Where diffusers' DDIM leaves the grid, check minisd's DDIM another way: with η = 1 it is
    DDPM's posterior (Song et al. 2021, eq. 16), and diffusers' DDPM does step on the grid."""
    config = {**SD_V1, "prediction_type": pred, "timestep_spacing": spacing}
    ours = S.DDIMScheduler.from_config({**config, "set_alpha_to_one": True})
    ref = diffusers.DDPMScheduler.from_config(config)
    xs, _ = trajectory(ours, n, torch.Generator().manual_seed(1), eta=1.0)
    ref_xs, _ = trajectory(ref, n, torch.Generator().manual_seed(1))
    assert_steps_close(xs, ref_xs)


def test_ddim_previous_timestep_comes_from_the_grid():
    s = S.DDIMScheduler(timestep_spacing="linspace")
    s.set_timesteps(10)
    assert s.previous_timestep(999).tolist() == [888]     # not 999 − 1000//10 = 899
    assert s.previous_timestep(0).tolist() == [-1]
    assert s.previous_timestep(torch.tensor([999, 111])).tolist() == [888, 0]


def test_dpm_solver_first_order_is_ddim():
    """DPM-Solver++(1) is DDIM with η = 0 (Lu et al. 2022): same grid, same samples."""
    config = {**SD, "timestep_spacing": "trailing"}
    dpm = S.DPMSolverMultistepScheduler(**config, solver_order=1)
    ddim = S.DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=True)
    xs, _ = trajectory(dpm, 20)
    ref_xs, _ = trajectory(ddim, 20)
    assert_steps_close(xs, ref_xs)


def test_generator_per_sample_matches_diffusers():
    gens = lambda: [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    xs, _ = trajectory(S.EulerAncestralDiscreteScheduler(**SD), 10, gens())
    ref_xs, _ = trajectory(diffusers.EulerAncestralDiscreteScheduler(**SD), 10, gens())
    assert_steps_close(xs, ref_xs)


def test_euler_ancestral_sample_prediction_equals_epsilon_form():
    """diffusers lacks `sample` prediction for Euler ancestral; check it against the same
    model written as an ε-predictor: ε̂ = (x − x̂_0)/σ."""
    eps_s = S.EulerAncestralDiscreteScheduler(**SD)
    x0_s = S.EulerAncestralDiscreteScheduler(**SD, prediction_type="sample")
    xs, _ = trajectory(eps_s, 10, torch.Generator().manual_seed(1))

    def x0_model(x_in, t):       # the x̂_0 that fake_model's ε̂ implies
        sigma = eps_s.sigmas[(eps_s.timesteps == t).nonzero()[0, 0]]
        return x_in * (sigma ** 2 + 1) ** 0.5 - sigma * fake_model(x_in, t)

    x0_xs, _ = trajectory(x0_s, 10, torch.Generator().manual_seed(1), model=x0_model)
    assert_steps_close(xs, x0_xs)


@pytest.mark.parametrize("cls,extra", [(c, {}) for c in CLASSES]
                         + [(S.DPMSolverMultistepScheduler, {"use_karras_sigmas": True})],
                         ids=[c.__name__ for c in CLASSES] + ["DPM-karras"])
def test_add_noise_matches_diffusers(cls, extra):
    config = {**SD, **extra}
    ours, ref = cls(**config), REFERENCE[cls](**config)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = ours.timesteps[[3, 20]]                               # one timestep per sample
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_half_precision_keeps_dtype(cls, dtype):
    xs, _ = trajectory(cls(**SD), 10, torch.Generator().manual_seed(1))

    def half_model(x, t):
        return fake_model(x.float(), t).to(dtype)

    s = cls(**SD)
    s.set_timesteps(10)
    x = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
         * s.init_noise_sigma).to(dtype)
    g = torch.Generator().manual_seed(1)
    for t in s.timesteps:
        out = s.step(half_model(s.scale_model_input(x, t), t), t, x, generator=g)
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
        x = out.prev_sample
    assert (x.float() - xs[-1]).abs().max() < 0.1 * xs[-1].abs().max()


@pytest.mark.parametrize("cls", [S.EulerDiscreteScheduler, S.EulerAncestralDiscreteScheduler,
                                 S.DPMSolverMultistepScheduler, S.DDIMScheduler],
                         ids=lambda c: c.__name__)
def test_zero_terminal_snr_trajectory_matches_diffusers(cls):
    config = {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}
    xs, _ = trajectory(cls(**config), 10, torch.Generator().manual_seed(1))
    ref_xs, _ = trajectory(REFERENCE[cls](**config), 10, torch.Generator().manual_seed(1))
    assert_steps_close(xs, ref_xs)
    assert all(x.isfinite().all() for x in xs)


# ---------------------------------------------------------------- cases


def test_alpha_prev_alignment_and_exact_ddim_inversion():
    s = S.DDIMScheduler(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4],
                        clip_sample=False)
    torch.testing.assert_close(s.schedule.alphas_cumprod,
                               torch.tensor([0.9, 0.72, 0.504, 0.3024]), atol=1e-7, rtol=0)
    torch.testing.assert_close(s.schedule.alphas_cumprod_prev,
                               torch.tensor([1.0, 0.9, 0.72, 0.504]), atol=1e-7, rtol=0)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [3, 2, 1, 0]
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        out = s.step(eps, t, s.add_noise(x0, eps, t))     # the true noise as prediction
        torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-6, rtol=0)
        prev = s.previous_timestep(t).item()
        expected = s.add_noise(x0, eps, prev) if prev >= 0 else x0
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=0)


def test_zero_terminal_snr():
    plain = S.EulerDiscreteScheduler(**SD)
    assert plain.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=1e-7)
    assert plain.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-7)
    s = S.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ac = s.alphas_cumprod
    assert ac[999].item() == 0.0
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert (ac[1:] < ac[:-1]).all()
    s.set_timesteps(10)
    assert s.sigmas.isfinite().all()
    # the last ᾱ is clamped to 2⁻²⁴ for σ: σ_max = √((1 − 2⁻²⁴)/2⁻²⁴) ≈ 4096
    assert s.sigmas[0].item() == pytest.approx(4096.0, abs=1e-3)
    assert S.SchedulerConfig().rescale_betas_zero_snr is False


def test_epsilon_at_zero_snr_is_refused():
    s = S.DDIMScheduler(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s.set_timesteps(10)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="v_prediction"):
        s.step(x, 999, x)


def test_ddpm_with_fewer_steps_than_training():
    s = S.DDPMScheduler(**SD, clip_sample=False)
    s.set_timesteps(100)
    assert s.timesteps[:2].tolist() == [990, 980]
    assert s.previous_timestep(990).item() == 980
    a990, a980 = 0.005191631615161896, 0.005843779072165489          # ᾱ_990, ᾱ_980
    beta = 1 - a990 / a980                                          # 0.111597, not β_990
    assert beta == pytest.approx(0.1115969, abs=1e-6)
    assert s.schedule.betas[990].item() == pytest.approx(0.0118419, abs=1e-6)
    variance = s.posterior_variance(990).item()
    assert variance == pytest.approx((1 - a980) / (1 - a990) * beta, rel=1e-5)   # 0.111524
    assert variance == pytest.approx(0.111524, abs=1e-6)
    all_variances = s.posterior_variance(s.timesteps)
    assert all_variances.isfinite().all() and (all_variances > 0).all()
    # one step written out: μ̃ + √β̃·z with the jump's β
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = s.step(eps, 990, x, generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x0 = (x - math.sqrt(1 - a990) * eps) / math.sqrt(a990)
    mean = (math.sqrt(a980) * beta / (1 - a990) * x0
            + math.sqrt(1 - beta) * (1 - a980) / (1 - a990) * x)
    torch.testing.assert_close(out.prev_sample, mean + math.sqrt(variance) * z,
                               atol=1e-5, rtol=1e-5)
    # a perfect noise oracle ends at x_0
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    for t in s.timesteps:
        a = s.alphas_cumprod[t]
        x = s.step((x - a.sqrt() * x0) / (1 - a).sqrt(), t, x, generator=g).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_ddim_last_step():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for set_alpha_to_one in (True, False):
        s = S.DDIMScheduler.from_config({**SD_V1, "set_alpha_to_one": set_alpha_to_one})
        s.set_timesteps(50)
        assert s.timesteps[-1].item() == 1
        out = s.step(eps, 1, x)
        if set_alpha_to_one:
            assert torch.equal(out.prev_sample, out.pred_original_sample)
        else:
            expected = math.sqrt(0.99915) * out.pred_original_sample + math.sqrt(0.00085) * eps
            torch.testing.assert_close(out.prev_sample, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("karras", [False, True])
def test_dpm_solver_ends_at_sigma_zero_with_a_first_order_step(karras):
    for n in (10, 11, 20, 25):
        s = S.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=karras)
        s.set_timesteps(n)
        assert s.sigmas[-1].item() == 0.0
        assert s.sigmas[-2].item() > 0.02916                     # not σ_min ≈ 0.0292 at the end
        assert s.orders == [1] + [2] * (n - 2) + [1]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in (20, 25):
        s = S.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=karras, prediction_type="sample")
        xs, _ = trajectory(s, n, model=lambda x, t: x0)          # an exact x_0 oracle
        torch.testing.assert_close(xs[-1], x0, atol=1e-6, rtol=0)


def _alpha_bar_at(s, t):
    """ᾱ of the sample at grid timestep t (from σ for the σ-schedulers)."""
    if getattr(s, "sigmas", None) is not None:
        return 1 / (s.sigmas[(s.timesteps == t).nonzero()[0, 0]] ** 2 + 1)
    return s.alphas_cumprod[int(t)]


def _recorded_input_stds(s, n):
    """Sample with a stub U-Net that records the std of its input. The stub is the exact
    ε-prediction for unit-Gaussian data, E[ε | x_t] = √(1−ᾱ_t)·x_t, under which every x_t is
    N(0, I): a correctly scaled input has std ≈ 1 at every step. (50 first-order steps lose a
    little variance at the end, DDPM's β̃ most: it ignores the uncertainty of x̂_0. A scaling
    fault would be off by a factor of about 14.6.)"""
    s.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 32, 32, generator=g) * s.init_noise_sigma
    stds = []
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        stds.append(x_in.std().item())
        eps = (1 - _alpha_bar_at(s, t)).sqrt() * x_in
        x = s.step(eps, t, x, generator=g).prev_sample
    return stds


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_model_input_has_unit_std(cls, spacing):
    s = cls.from_config({**SD_V1, "timestep_spacing": spacing})
    stds = _recorded_input_stds(s, 50)
    assert abs(stds[0] - 1) < 0.005, stds       # the scaled starting noise: 0.998 to 1.004
    assert all(abs(v - 1) < 0.1 for v in stds), stds
    x0 = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    for t in s.timesteps:       # a correctly noised sample, scaled, has std ≈ 1
        assert abs(s.scale_model_input(s.add_noise(x0, eps, t), t).std().item() - 1) < 0.03


def test_init_noise_sigma():
    s = S.EulerDiscreteScheduler.from_config(SD_V1)          # linspace
    assert s.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)
    s.set_timesteps(50)
    assert s.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)
    assert s.sigmas[-2].item() == pytest.approx(0.02917, abs=1e-5)   # σ_min at t = 0
    leading = S.EulerDiscreteScheduler.from_config({**SD_V1, "timestep_spacing": "leading"})
    leading.set_timesteps(50)                                   # σ(981) = 13.1204
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(13.1204 ** 2 + 1), abs=1e-3)
    for cls in (S.DDPMScheduler, S.DDIMScheduler, S.DPMSolverMultistepScheduler):
        assert cls.from_config(SD_V1).init_noise_sigma == 1.0


def test_ancestral_noise_is_ddpm_posterior_in_sigma():
    """σ_up² of Euler ancestral equals DDPM's β̃/ᾱ_{t'} (the same variance, in σ units)."""
    euler = S.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
    ddpm = S.DDPMScheduler(**SD, timestep_spacing="trailing")
    euler.set_timesteps(10)
    ddpm.set_timesteps(10)
    for i, t in enumerate(ddpm.timesteps[:-1]):
        sigma, sigma_next = euler.sigmas[i].double(), euler.sigmas[i + 1].double()
        sigma_up_sq = sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2
        a_prev = ddpm.alphas_cumprod[ddpm.previous_timestep(t)].double()
        assert sigma_up_sq.item() == pytest.approx(
            (ddpm.posterior_variance(t).double() / a_prev).item(), rel=1e-4)


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _devices())
def test_per_sample_sigma_same_on_every_device(device):
    s = S.EulerDiscreteScheduler(**SD)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 5
    model_output = torch.randn(2, 4, 8, 8, generator=g)
    s.set_timesteps(10)
    t = s.timesteps[[2, 7]]                                   # σ of shape (2,)
    cpu = s.step(model_output, t, x).prev_sample
    for i in range(2):                                        # each sample at its own σ
        one = s.step(model_output[i:i + 1], t[i], x[i:i + 1]).prev_sample
        torch.testing.assert_close(cpu[i:i + 1], one, atol=0, rtol=0)
    s.set_timesteps(10, device=device)
    t = s.timesteps[[2, 7]]
    out = s.step(model_output.to(device), t, x.to(device))
    scaled = s.scale_model_input(x.to(device), t)
    assert out.prev_sample.device.type == device
    assert out.prev_sample.isfinite().all() and scaled.isfinite().all()
    torch.testing.assert_close(out.prev_sample.cpu(), cpu, atol=1e-4, rtol=0)
    expected = x / (s.sigmas[[2, 7]] ** 2 + 1).sqrt().reshape(2, 1, 1, 1)
    torch.testing.assert_close(scaled.cpu(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_step_counts(cls):
    s = cls(**SD)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        s.set_timesteps(0)
    limit = 999 if cls is S.DPMSolverMultistepScheduler else 1000    # linspace: n + 1 points
    assert s.max_inference_steps == limit
    with pytest.raises(ValueError, match=f"num_inference_steps=1001 .* use at most {limit}$"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="whole number"):
        s.set_timesteps(2.5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_before_set_timesteps_and_off_grid(cls):
    s = cls(**SD)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.scale_model_input(x, 999)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep \\[501.*not on the grid.*scheduler.timesteps"):
        s.step(x, 501, x)
    with pytest.raises(ValueError, match="got 3 timesteps for a batch of 1|one timestep"):
        s.step(x, s.timesteps[:3], x)


def test_unknown_spacing_prediction_type_and_schedule():
    with pytest.raises(ValueError, match="timestep_spacing 'even'; choose one of leading, "
                                         "linspace, trailing"):
        S.EulerDiscreteScheduler(timestep_spacing="even")
    with pytest.raises(ValueError, match="prediction_type 'noise'; choose one of epsilon, "
                                         "v_prediction, sample"):
        S.DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        S.DDPMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="solver_order 3"):
        S.DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="trained_betas has 3 values but num_train_timesteps"):
        S.DDIMScheduler(trained_betas=[0.1, 0.2, 0.3])


def test_dpm_solver_needs_grid_order_and_one_timestep():
    s = S.DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(10)
    x = torch.randn(2, 4, 2, 2)
    s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="in the order of scheduler.timesteps \\(next is "):
        s.step(x, s.timesteps[2], x)
    with pytest.raises(ValueError, match="one timestep"):
        s.step(x, s.timesteps[1:3], x)
    with pytest.raises(ValueError, match="gives at most 999 distinct steps"):
        s.set_timesteps(1000)


def test_leading_offset_past_the_last_timestep():
    """spaced_timesteps itself refuses a grid that would reach t = T."""
    with pytest.raises(ValueError, match="from 1 to 1000, outside the training range 0 … 999"):
        S.spaced_timesteps(1000, 1000, "leading", 1)


def test_bad_generators_and_config_path(tmp_path):
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        S.randn_tensor((2, 4), [torch.Generator() for _ in range(3)])
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.DDIMScheduler.from_pretrained(tmp_path)


# ---------------------------------------------------------------- step counts the grid can give

# the most steps of each scheduler on 1000 training timesteps, by spacing and steps_offset: T,
# less one where a leading grid with offset 1 would reach t = 1000, and DPM-Solver's linspace and
# leading grids take n + 1 points and drop the last
LIMITS = {
    ("leading", 0): 1000, ("leading", 1): 999, ("linspace", 0): 1000, ("linspace", 1): 1000,
    ("trailing", 0): 1000, ("trailing", 1): 1000,
}
DPM_LIMITS = {
    ("leading", 0): 999, ("leading", 1): 998, ("linspace", 0): 999, ("linspace", 1): 999,
    ("trailing", 0): 1000, ("trailing", 1): 1000,
}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("offset", (0, 1))
def test_every_step_count_up_to_the_limit_gives_that_many_distinct_timesteps(cls, offset):
    limits = DPM_LIMITS if cls is S.DPMSolverMultistepScheduler else LIMITS
    for spacing in SPACINGS:
        s = cls(**SD, timestep_spacing=spacing, steps_offset=offset)
        limit = s.max_inference_steps
        assert limit == limits[spacing, offset]
        for n in range(1, limit + 1):
            s.set_timesteps(n)
            t = s.timesteps.tolist()
            assert len(t) == len(set(t)) == n and 0 <= min(t) and max(t) <= 999, (spacing, n)
        with pytest.raises(ValueError, match=f"gives at most {limit} distinct steps; use at "
                                             f"most {limit}"):
            s.set_timesteps(limit + 1)


def test_a_step_count_the_grid_cannot_give_names_the_limit_and_the_spacing_that_can():
    with pytest.raises(ValueError) as refused:
        S.DDIMScheduler.from_config(SD_V1).set_timesteps(1000)
    assert str(refused.value) == (
        "num_inference_steps=1000 is more than DDIMScheduler's grid can give: leading spacing "
        "with steps_offset=1 on 1000 training timesteps gives at most 999 distinct steps; use "
        "at most 999, or timestep_spacing='linspace' or 'trailing', which give 1000")
    with pytest.raises(ValueError) as refused:
        S.DPMSolverMultistepScheduler.from_config(SD_V1).set_timesteps(1000)   # linspace
    assert str(refused.value).endswith("gives at most 999 distinct steps; use at most 999, or "
                                       "timestep_spacing='trailing', which gives 1000")
    assert S.DDIMScheduler.from_config(SD_V1).spacings_allowing(1000) == ["linspace", "trailing"]
    assert S.max_grid_steps(1000, "leading", 1) == 999
    assert S.max_grid_steps(1000, "leading", 0) == S.max_grid_steps(1000, "trailing", 1) == 1000


# ---------------------------------------------------------------- ancestral noise


def _ancestral_run(scheduler, start, generator, n=10):
    """Euler ancestral with the stand-in model ε̂ = 0.3·x_in + 0.1 from x = start·σ_init."""
    scheduler.set_timesteps(n)
    x = start * scheduler.init_noise_sigma
    xs = []
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(x, t) + 0.1
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
        xs.append(x)
    return xs


def test_ancestral_noise_comes_from_the_callers_generator():
    """SD v1 schedule, leading spacing with steps_offset 1, 10 steps: seed 0 twice gives the same
    trajectory bit for bit, seed 1 another, and diffusers' EulerAncestralDiscreteScheduler fed
    the same generator draws the same noise in the same order (huggingface/diffusers PR #1019)."""
    config = {**SD_V1, "timestep_spacing": "leading"}
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))

    def ours(seed):
        return _ancestral_run(S.EulerAncestralDiscreteScheduler.from_config(config), start,
                              torch.Generator().manual_seed(seed))

    first, again, other = ours(0), ours(0), ours(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert (first[-1] - other[-1]).abs().max() > 0.1
    reference = _ancestral_run(diffusers.EulerAncestralDiscreteScheduler.from_config(config),
                               start, torch.Generator().manual_seed(0))
    assert_steps_close(first, reference)


def test_a_list_of_generators_gives_each_sample_its_own_stream():
    """Slice i of a batched ancestral step (and trajectory) with generators [10, 11, 12] equals
    the one-sample run with generator i."""
    config = {**SD_V1, "timestep_spacing": "leading"}
    start = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    batched = _ancestral_run(S.EulerAncestralDiscreteScheduler.from_config(config), start,
                             [torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i in range(3):
        alone = _ancestral_run(S.EulerAncestralDiscreteScheduler.from_config(config),
                               start[i:i + 1], torch.Generator().manual_seed(10 + i))
        for step, (b, a) in enumerate(zip(batched, alone, strict=True)):
            torch.testing.assert_close(b[i:i + 1], a, atol=0, rtol=0,
                                       msg=lambda m, step=step: f"step {step}: {m}")


# ---------------------------------------------------------------- Karras σ on the cosine schedule


def _vp(sigma):
    """(α_t, σ_t) of the variance-preserving form at noise level σ."""
    return 1 / (sigma ** 2 + 1) ** 0.5, sigma / (sigma ** 2 + 1) ** 0.5


def test_karras_sigmas_on_the_cosine_schedule_run_every_step_with_its_own_sigma():
    """DPM-Solver++ 2M, squaredcos_cap_v2, Karras σ, 20 steps: t = 999 five times, yet every
    step uses its own σ (with the true noise as model output each step lands exactly on
    α_{i+1}·x_0 + σ_{i+1}·ε), the last σ is 0, x_0 comes back to float32 precision at
    σ_max ≈ 20291 (1e-2), and a step past the end is an error, not an IndexError
    (huggingface/diffusers #12771)."""
    s = S.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    s.set_timesteps(20)
    assert s.timesteps.tolist() == [999] * 5 + [998] * 5 + [996, 994, 990, 978, 950, 868, 624,
                                                             221, 34, 0]
    assert len(set(s.sigmas.tolist())) == 21 and s.sigmas[-1].item() == 0.0
    assert s.sigmas[0].item() == pytest.approx(20291.3, abs=0.1)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alpha, sigma = _vp(s.sigmas[0].double())
    x = (alpha * x0 + sigma * eps).float()
    for i, t in enumerate(s.timesteps):
        x = s.step(eps, t, x).prev_sample
        alpha, sigma = _vp(s.sigmas[i + 1].double())
        torch.testing.assert_close(x, (alpha * x0 + sigma * eps).float(), atol=1e-2, rtol=0)
    assert x.isfinite().all()
    assert (x - x0).abs().max() < 1e-2
    with pytest.raises(ValueError, match="all steps are done"):
        s.step(eps, 0, x)


# ---------------------------------------------------------------- v-prediction


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_v_prediction_gives_back_x0_in_every_scheduler(cls, spacing):
    """v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022, §4) at every point of a 10-step grid: one
    step returns pred_original_sample = x_0 within 1e-6. The sample is x_t = √ᾱ·x_0 + √(1−ᾱ)·ε
    for DDPM, DDIM and DPM-Solver++ and x = x_0 + σ·ε for the Euler schedulers, where
    x̂_0 = x/(σ²+1) − σ/√(σ²+1)·v (huggingface/diffusers #7046)."""
    s = cls.from_config({**SD_V1, "prediction_type": "v_prediction", "timestep_spacing": spacing})
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma_form = isinstance(s, S.EulerDiscreteScheduler)
    for i, t in enumerate(s.timesteps):
        s.set_begin_index(i)                     # DPM-Solver steps from a grid position
        if getattr(s, "sigmas", None) is not None:
            alpha_bar = 1 / (s.sigmas[i] ** 2 + 1)
        else:
            alpha_bar = s.alphas_cumprod[int(t)]
        v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
        if sigma_form:
            x = x0 + s.sigmas[i] * eps
        else:
            x = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
        out = s.step(v, t, x, generator=torch.Generator().manual_seed(1))
        assert (out.pred_original_sample - x0).abs().max() < 1e-6, (i, t)
