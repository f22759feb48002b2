"""Chapter 5's pictures (minisd.viz), drawn without a front end."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from figures import readable

from minisd import schedulers as S
from minisd import viz
from minisd.shapes.world import Prompt, Scene, SceneObject, render

# stable-diffusion-v1-5/scheduler/scheduler_config.json, as published.
SD_V1 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def test_grid_sigmas_put_every_scheduler_on_the_sigma_axis():
    ddim, euler, dpm = (S.from_name(n, SD_V1) for n in ("ddim", "euler", "dpmpp_2m"))
    for s in (ddim, euler, dpm):
        s.set_timesteps(10)
    # DDIM's leading grid 901 … 1, then ᾱ_0 = 0.99915 (set_alpha_to_one=False).
    sigma_901 = ((1 - ddim.alphas_cumprod[901]) / ddim.alphas_cumprod[901]) ** 0.5
    ddim_sigmas = viz.grid_sigmas(ddim)
    assert ddim_sigmas.shape == (11,)
    torch.testing.assert_close(ddim_sigmas[0], sigma_901.float())
    torch.testing.assert_close(ddim_sigmas[-1], torch.tensor(0.02917), atol=1e-5, rtol=0)
    # Euler: linspace 999 … 0, σ_max ≈ 14.6146 then σ_min ≈ 0.02917 and a final 0.
    torch.testing.assert_close(viz.grid_sigmas(euler)[[0, 9, 10]],
                               torch.tensor([14.6146, 0.02917, 0.0]), atol=1e-4, rtol=0)
    assert viz.grid_sigmas(dpm)[-1] == 0.0                        # DPM-Solver++ ends at σ = 0


def test_grid_sigmas_of_ddim_going_to_a_clean_sample_end_at_zero():
    s = S.from_name("ddim", SD_V1, set_alpha_to_one=True)
    s.set_timesteps(5)
    assert viz.grid_sigmas(s)[-1] == 0.0


def test_grid_sigmas_before_set_timesteps_says_what_to_do():
    with pytest.raises(ValueError, match="set_timesteps"):
        viz.grid_sigmas(S.from_name("ddpm", SD_V1))


def test_plot_scheduler_grids_draws_each_grid():
    schedulers = {name: S.from_name(name, SD_V1) for name in ("ddim", "euler", "dpmpp_2m")}
    fig = viz.plot_scheduler_grids(schedulers, 10)
    ax_t, ax_s = fig.axes
    assert [line.get_label() for line in ax_t.get_lines()] == ["ddim", "euler", "dpmpp_2m"]
    np.testing.assert_array_equal(ax_t.get_lines()[0].get_ydata(),
                                  [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    np.testing.assert_array_equal(ax_t.get_lines()[2].get_ydata(),
                                  [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])
    for line, s in zip(ax_s.get_lines(), schedulers.values()):
        assert len(line.get_ydata()) == 11
        np.testing.assert_allclose(line.get_ydata(), viz.grid_sigmas(s).numpy())
    assert ax_t.get_ylabel().startswith("timestep t") and ax_s.get_ylabel().startswith("σ")
    readable(fig)


def test_draw_trajectories_one_row_per_scheduler():
    g = torch.Generator().manual_seed(0)
    pictures = [torch.rand(3, 4, 4, generator=g) * 2 - 1 for _ in range(3)]
    fig = viz.draw_trajectories({"ddim": ([901, 501, 1], pictures),
                                 "euler": ([999.0, 0.5], pictures[:2])})
    assert len(fig.axes) == 6
    first, last = fig.axes[0], fig.axes[5]
    assert first.get_ylabel() == "ddim" and fig.axes[3].get_ylabel() == "euler"
    assert [ax.get_title() for ax in fig.axes] == ["t=901", "t=501", "t=1", "t=999", "t=0.5", ""]
    np.testing.assert_allclose(np.asarray(first.get_images()[0].get_array()),
                               viz.to_image(pictures[0]))
    assert not last.get_images()                               # the shorter row stays empty
    readable(fig)


class RenderingPipe:
    """Stands in for StableDiffusionPipeline: records its arguments and returns a given
    picture (3, H, W) in [−1, 1] the way the pipeline returns output_type='pt', in [0, 1]."""

    def __init__(self, picture):
        self.picture, self.calls = picture, []

    def __call__(self, prompt, **kwargs):
        self.calls.append((prompt, kwargs))
        return SimpleNamespace(images=((self.picture + 1) / 2)[None])


SCENE = Scene((SceneObject("circle", "red", "large", "center"),), background="white")
PROMPT = Prompt("a large red circle in the center on white", SCENE)


def test_draw_sample_passes_the_controls_to_the_pipeline_and_shows_its_picture():
    picture = render(SCENE)
    pipe = RenderingPipe(picture)
    fig = viz.draw_sample(pipe, PROMPT.caption, scheduler="euler", num_inference_steps=7,
                          guidance_scale=3.0, seed=5)
    assert pipe.calls == [(PROMPT.caption, {"num_inference_steps": 7, "guidance_scale": 3.0,
                                            "seed": 5, "scheduler": "euler",
                                            "output_type": "pt", "progress": False})]
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()),
                               viz.to_image(picture), atol=1e-6)
    assert "euler, 7 steps, s = 3, seed 5" in ax.get_title()
    assert not ax.texts                                  # a plain caption: no judge verdict
    plt.close(fig)


def test_draw_sample_writes_the_judges_verdict_for_a_prompt():
    right = viz.draw_sample(RenderingPipe(render(SCENE)), PROMPT)
    assert right.axes[0].texts[0].get_text() == "judge: all right"
    blue = Scene((SceneObject("circle", "blue", "large", "center"),), background="white")
    wrong = viz.draw_sample(RenderingPipe(render(blue)), PROMPT)
    assert wrong.axes[0].texts[0].get_text() == "judge: wrong colour"
    plt.close("all")
