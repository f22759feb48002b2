"""viz.draw_text_to_image (chapter 6's prompt widget), tested without widgets on a tiny
random pipeline: the picture it shows is the pipeline's own, the x̂_0 previews are the
decoded predictions of the steps it names, and bad input fails clearly."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import SD_SCHEDULE, tiny_pipeline
from figures import readable

from minisd import viz
from minisd.schedulers import from_name


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("ddim")


def shown(ax) -> np.ndarray:
    return np.asarray(ax.get_images()[0].get_array())


def test_the_picture_is_the_pipelines_and_the_title_names_the_settings(pipe):
    fig = viz.draw_text_to_image(pipe, "a red circle", negative_prompt="blue",
                                 num_inference_steps=5, guidance_scale=3.0, seed=7,
                                 scheduler="euler", num_previews=3)
    expected = pipe("a red circle", negative_prompt="blue", num_inference_steps=5,
                    guidance_scale=3.0, seed=7, scheduler="euler", output_type="pt",
                    progress=False).images[0] * 2 - 1
    assert len(fig.axes) == 4                                   # 3 previews + the picture
    np.testing.assert_allclose(shown(fig.axes[-1]), viz.to_image(expected), atol=1e-6)
    assert fig.axes[-1].get_title() == ("“a red circle”, not “blue”\n"
                                        "euler, 5 steps, s = 3, seed 7")
    readable(fig)


def test_previews_are_the_decoded_x0_of_the_first_middle_and_last_step(pipe):
    fig = viz.draw_text_to_image(pipe, "a red circle", num_inference_steps=5, seed=1,
                                 num_previews=3)       # the model's own guidance scale
    states = list(pipe.denoising_steps("a red circle", num_inference_steps=5,
                                       guidance_scale=pipe.sampling_defaults.guidance_scale,
                                       seed=1, progress=False))
    # DDIM, leading spacing with offset 1: 801, 601, 401, 201, 1 → steps 0, 2, 4
    assert [ax.get_title() for ax in fig.axes[:3]] == ["x̂_0 at t = 801", "x̂_0 at t = 401",
                                                       "x̂_0 at t = 1"]
    for ax, step in zip(fig.axes[:3], (0, 2, 4)):
        guess = pipe.decode(states[step].pred_original_sample, output_type="pt")[0] * 2 - 1
        # decoded one at a time here, as a batch of three there: float rounding differs
        np.testing.assert_allclose(shown(ax), viz.to_image(guess), atol=1e-5)
    s = pipe.sampling_defaults.guidance_scale
    assert fig.axes[-1].get_title().endswith(f"DDIMScheduler, 5 steps, s = {s:g}, seed 1")
    plt.close(fig)


def test_no_previews_and_fewer_steps_than_previews(pipe):
    alone = viz.draw_text_to_image(pipe, "red", num_inference_steps=2, num_previews=0)
    assert len(alone.axes) == 1
    crowded = viz.draw_text_to_image(pipe, "red", num_inference_steps=2, num_previews=6)
    assert len(crowded.axes) == 3                               # one preview per step at most
    plt.close("all")


def test_bad_input_fails_clearly(pipe):
    with pytest.raises(ValueError, match="num_previews must be ≥ 0"):
        viz.draw_text_to_image(pipe, "red", num_previews=-1)
    with pytest.raises(ValueError, match="ddim"):               # lists the known schedulers
        viz.draw_text_to_image(pipe, "red", num_inference_steps=2, scheduler="plms")
    with pytest.raises(ValueError, match="num_inference_steps"):
        viz.draw_text_to_image(pipe, "red", num_inference_steps=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noise_prediction_reads_the_u_nets_output_by_its_prediction_type(kind):
    """With a U-Net that predicts its target exactly, the predicted noise is the noise added
    and the guess is the clean picture, whatever the model predicts (ε, v or x_0)."""
    pipe = tiny_pipeline("ddim")
    pipe.scheduler = from_name("ddim", {**SD_SCHEDULE, "prediction_type": kind})
    picture = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t, seed = 600, 4
    generator = torch.Generator().manual_seed(seed)            # the draws the function makes
    z0 = pipe.vae.encode_latents(picture[None], generator).detach()
    noise = torch.randn(z0.shape, generator=generator)
    a = pipe.scheduler.alphas_cumprod[t]
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0,
              "sample": z0}[kind]

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))   # the pipeline's device, dtype

        def forward(self, sample, timestep, context):
            return target

    pipe.unet = Oracle()
    fig = viz.draw_noise_prediction(pipe, picture, "red", t, seed=seed)
    panels = [shown(ax) for ax in fig.axes]
    np.testing.assert_allclose(panels[3], panels[2], atol=1e-5)      # predicted == added noise
    clean = pipe.decode(z0, output_type="pt")[0] * 2 - 1
    np.testing.assert_allclose(panels[4], viz.to_image(clean), atol=1e-5)
    readable(fig)
