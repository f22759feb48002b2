"""Switching schedulers keeps the model's settings, exactly as diffusers' `from_config` does:
every key the model's config set that the new scheduler has is kept, and the new scheduler's
own defaults fill in only the keys the config does not have."""

import json
import math
import warnings

import diffusers
import pytest
import torch
from conftest import tiny_pipeline

from minisd import checkpoints
from minisd import schedulers as S
from minisd.schedulers import SD_V1_SCHEDULER_CONFIG as SD_V1

diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

NAMES = list(S.SCHEDULERS)
KEPT = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
        "steps_offset", "timestep_spacing", "rescale_betas_zero_snr", "set_alpha_to_one",
        "clip_sample", "clip_sample_range")
# what SD v1.5's PNDM config becomes in each scheduler: keys it sets are kept (steps_offset 1,
# set_alpha_to_one False, clip_sample False); the spacing it does not set is each one's own
EXPECTED_SPACING = {"ddpm": "leading", "ddim": "leading", "euler": "linspace",
                    "euler_ancestral": "linspace", "dpmpp_2m": "linspace"}


def diffusers_switch(name, config):
    """diffusers' `X.from_config(loaded.config)` with `loaded` read from `config`."""
    loaded = getattr(diffusers, config["_class_name"]).from_config(config)
    return getattr(diffusers, S.SCHEDULERS[name].__name__).from_config(loaded.config)


def loaded_sd_v1():
    """What minisd loads for SD v1.5's scheduler folder: it has no PNDM, so DPM-Solver++ on the
    same settings (with a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return checkpoints.load_scheduler(SD_V1)


def trajectory(scheduler, n=25):
    """n steps of a smooth stand-in model from seeded noise: the grid, every step's coefficients
    and the last step (to ᾱ = 1 or σ = 0, or DDIM's ᾱ_0 with set_alpha_to_one False)."""
    scheduler.set_timesteps(n)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x * scheduler.init_noise_sigma
    g = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = 0.9 * math.cos(float(t) / 700) * model_input + 0.1 * torch.sin(3 * model_input)
        x = scheduler.step(out, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("name", NAMES)
def test_sd_v1_config_switched_to_each_scheduler_matches_diffusers(name):
    """SD v1.5's scheduler config (PNDM, steps_offset 1, set_alpha_to_one False, no
    timestep_spacing), switched directly and through the scheduler minisd loads for it:
    the same settings, grid and last step as diffusers' switch."""
    reference = diffusers_switch(name, SD_V1)
    for ours in (S.from_name(name, SD_V1), S.from_name(name, loaded_sd_v1().config),
                 S.SCHEDULERS[name].from_config(loaded_sd_v1().to_config())):
        for key in KEPT:
            if hasattr(ours.config, key):
                assert getattr(ours.config, key) == reference.config[key], key
        assert ours.config.timestep_spacing == EXPECTED_SPACING[name]
        assert ours.config.steps_offset == 1
        for n in (10, 25, 50):
            ours.set_timesteps(n)
            reference.set_timesteps(n)
            assert torch.equal(ours.timesteps, reference.timesteps), n
        torch.testing.assert_close(trajectory(ours), trajectory(reference), atol=1e-5, rtol=1e-6)
    if name == "ddim":                  # the last step goes to ᾱ_0, not to a clean sample
        assert ours.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-7)
        assert reference.final_alpha_cumprod.item() == pytest.approx(0.99915, abs=1e-7)


def test_a_detour_through_another_scheduler_keeps_what_the_model_set():
    """SD v1 → DPM-Solver++ (which fills in linspace spacing and has no set_alpha_to_one) →
    DDIM: DDIM takes its own 'leading' (the model never set a spacing) and keeps
    set_alpha_to_one False and clip_sample False (the model did set them), as in diffusers."""
    dpm = S.DPMSolverMultistepScheduler.from_config(SD_V1)
    assert dpm.config.timestep_spacing == "linspace"
    assert "timestep_spacing" in dpm.config.use_default_values
    assert dpm.config.other_keys == {"set_alpha_to_one": False, "skip_prk_steps": True,
                                     "clip_sample": False}
    ddim = S.DDIMScheduler.from_config(dpm.config)
    assert (ddim.config.timestep_spacing, ddim.config.set_alpha_to_one,
            ddim.config.clip_sample, ddim.config.steps_offset) == ("leading", False, False, 1)
    reference = diffusers.DDIMScheduler.from_config(
        diffusers.DPMSolverMultistepScheduler.from_config(SD_V1).config)
    for key in KEPT:
        assert getattr(ddim.config, key) == reference.config[key], key


def test_keys_set_explicitly_are_kept_and_overrides_win():
    """A spacing the config sets is kept by every scheduler; an override replaces it."""
    config = {**SD_V1, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    for name in NAMES:
        s = S.from_name(name, S.from_name("ddim", config).config)
        assert (s.config.timestep_spacing, s.config.prediction_type) == \
            ("trailing", "v_prediction")
    s = S.from_name("euler", config, timestep_spacing="leading")
    assert s.config.timestep_spacing == "leading"
    assert "timestep_spacing" not in s.config.use_default_values


def test_saved_config_reads_back_in_minisd_and_diffusers(tmp_path):
    """A saved config has no _use_default_values (as diffusers saves it): what the scheduler
    used is written out, so a later switch keeps it; the kept keys of other schedulers are
    written too, and diffusers switches from the file as minisd does."""
    path = S.DPMSolverMultistepScheduler.from_config(SD_V1).save_pretrained(tmp_path)
    saved = json.loads(path.read_text())
    assert "_use_default_values" not in saved
    assert (saved["timestep_spacing"], saved["set_alpha_to_one"]) == ("linspace", False)
    ours = S.DDIMScheduler.from_pretrained(tmp_path)
    reference = diffusers.DDIMScheduler.from_config(
        diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path).config)
    for key in KEPT:
        assert getattr(ours.config, key) == reference.config[key], key


def test_switching_by_name_in_the_pipeline_keeps_the_models_settings():
    """pipe(…, scheduler="ddim") samples with DDIMScheduler.from_config(pipe.scheduler.config):
    the tiny pipeline's DPM-Solver++ was built from SD v1's settings without a spacing, so DDIM
    runs on its own leading grid with steps_offset 1, set_alpha_to_one False and unclipped
    x̂_0, like diffusers' switch."""
    pipe = tiny_pipeline()
    run = {"num_inference_steps": 4, "seed": 0, "output_type": "latent", "progress": False}
    by_name = pipe("a red circle", scheduler="ddim", **run).images
    explicit = S.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, steps_offset=1, clip_sample=False,
                               set_alpha_to_one=False)
    assert explicit.config.timestep_spacing == "leading"
    torch.testing.assert_close(by_name, pipe("a red circle", scheduler=explicit, **run).images,
                               atol=0, rtol=0)
    assert pipe.scheduler.timesteps is None           # the pipeline's own was not touched
