"""The pictures behind the widgets, drawn without a front end."""

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from minisd import viz
from minisd.noise import NoiseSchedule


def test_to_image_maps_range_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 2, 2)
    img = viz.to_image(x)
    assert img.shape == (2, 2, 3)
    np.testing.assert_allclose(img[..., 0].ravel(), [0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, 4), torch.zeros(4, 4)])
def test_to_image_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="shape"):
        viz.to_image(bad)


def test_to_image_refuses_nan_instead_of_drawing_black():
    with pytest.raises(ValueError, match="NaN"):
        viz.to_image(torch.full((3, 2, 2), float("nan")))


def test_draw_noised_shows_x_t_for_the_chosen_step():
    x0 = torch.zeros(3, 8, 8)
    s = NoiseSchedule()
    fig = viz.draw_noised(x0, s, t=999, seed=0)
    image_axes = fig.axes[0]
    assert "t = 999" in image_axes.get_title()
    shown = image_axes.get_images()[0].get_array()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = viz.to_image(s.add_noise(x0[None], noise[None], 999)[0])
    np.testing.assert_allclose(np.asarray(shown), expected, atol=1e-6)
    plt.close(fig)


def test_interactive_degrades_to_the_static_picture_outside_jupyter():
    calls = []

    def draw(t, name):
        calls.append((t, name))
        return plt.figure()

    fig = viz.interactive(draw, t=widgets.IntSlider(value=7, min=0, max=9),
                          name=widgets.Dropdown(options=["a", "b"], value="b"))
    assert calls == [(7, "b")]
    assert isinstance(fig, plt.Figure)
    plt.close(fig)


def test_plot_schedules_draws_one_line_per_schedule_and_panel():
    fig = viz.plot_schedules({"a": NoiseSchedule(), "b": NoiseSchedule(beta_schedule="squaredcos_cap_v2")})
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2]
    plt.close(fig)


def test_show_images_grid_and_titles():
    fig = viz.show_images([torch.zeros(3, 4, 4)] * 5, titles=list("abcde"), ncols=3)
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:5]] == list("abcde")
    plt.close(fig)
