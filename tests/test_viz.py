"""The pictures behind the widgets and the chapters' figures, drawn without a front end:
they show what they claim, fit the notebook's width and keep their texts apart."""

import base64
from types import SimpleNamespace

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from figures import readable

from minisd import viz
from minisd.noise import NoiseSchedule
from minisd.unet import UNet2DConditionModel


def pictures(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(n)]


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
    image_axes, hist = fig.axes
    assert "t = 999" in image_axes.get_title()
    shown = image_axes.get_images()[0].get_array()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = viz.to_image(s.add_noise(x0[None], noise[None], 999)[0])
    np.testing.assert_allclose(np.asarray(shown), expected, atol=1e-6)
    assert hist.get_xlabel() and hist.get_ylabel() == "density"
    readable(fig)


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


def test_in_a_kernel_the_widget_is_stored_with_its_starting_picture(monkeypatch):
    shown, calls = [], []
    monkeypatch.setattr(viz, "in_jupyter_kernel", lambda: True)
    monkeypatch.setattr("IPython.display.display",
                        lambda obj, raw=False: shown.append((obj, raw)))

    def draw(t):
        calls.append(t)
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.set_title(f"t = {t}")
        return fig

    slider = widgets.IntSlider(value=3, min=0, max=9)
    assert viz.interactive(draw, t=slider) is None
    assert calls == [3]                            # the first picture is drawn once, not twice
    bundle, raw = next((obj, raw) for obj, raw in shown if isinstance(obj, dict))
    assert raw
    assert set(bundle) == {"application/vnd.jupyter.widget-view+json", "image/png",
                           "text/plain"}
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "IntSlider" not in bundle["text/plain"] and "t" in bundle["text/plain"]
    assert not plt.get_fignums()                   # nothing left open to show twice
    slider.value = 5                                # a change redraws with the new value
    assert calls == [3, 5]
    plt.close("all")


def test_plot_schedules_draws_one_line_per_schedule_and_panel():
    fig = viz.plot_schedules({"a": NoiseSchedule(),
                              "b": NoiseSchedule(beta_schedule="squaredcos_cap_v2")})
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2]
    assert all(ax.get_xlabel() == "timestep t" and ax.get_ylabel() for ax in fig.axes)
    readable(fig)


def test_show_images_grid_and_titles():
    fig = viz.show_images(pictures(5), titles=list("abcde"), ncols=3, title="all of them")
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:5]] == list("abcde")
    readable(fig)


def test_a_wide_row_of_pictures_is_scaled_to_the_notebook_width():
    readable(viz.show_images(pictures(12), titles=[f"dpmpp_2m, {n}" for n in range(12)],
                             size=1.5))


def test_show_image_grid_labels_rows_and_columns():
    rows = {"a red circle left of a blue square": pictures(3), "short": pictures(2, seed=1)}
    fig = viz.show_image_grid(rows, column_titles=["s = 0", "s = 1", "s = 8"], title="guidance")
    axes = np.array(fig.axes).reshape(2, 3)
    assert axes[0, 0].get_ylabel() == "a red circle left of a\nblue square"
    assert [ax.get_title() for ax in axes[0]] == ["s = 0", "s = 1", "s = 8"]
    np.testing.assert_allclose(np.asarray(axes[1, 1].get_images()[0].get_array()),
                               viz.to_image(rows["short"][1]))
    assert not axes[1, 2].get_images()               # the shorter row ends early
    assert fig._suptitle.get_text() == "guidance"
    readable(fig)
    with pytest.raises(ValueError, match="2 column titles for 3 columns"):
        viz.show_image_grid(rows, column_titles=["a", "b"])


def test_draw_diffusion_labels_its_arrows():
    fig = viz.draw_diffusion(pictures(6), [f"t = {t}" for t in range(6)],
                             [("forward diffusion →", "right"), ("← reverse diffusion", "left")])
    assert {t.get_text() for t in fig.texts} == {"forward diffusion →", "← reverse diffusion"}
    starts = sorted(p.get_path().vertices[0][0] for p in fig.artists)
    assert len(fig.artists) == 2 and starts[0] < 0.5 < starts[1]    # one each way
    readable(fig)


def test_unet_stages_say_where_sd_v1_attends():
    with torch.device("meta"):
        sd = UNet2DConditionModel()                    # SD v1's configuration
        stages = viz.unet_stages(sd, torch.zeros(2, 4, 64, 64), torch.zeros(2, 77, 768))
    assert [s["name"] for s in stages] == ["conv_in", *(f"down_blocks.{i}" for i in range(4)),
                                           "mid_block", *(f"up_blocks.{i}" for i in range(4)),
                                           "conv_out"]
    assert [s["attention"] for s in stages] == ["", *["self + cross"] * 3, "", "self + cross",
                                                "", *["self + cross"] * 3, ""]
    assert [s["shape"][1:] for s in stages] == [
        (320, 64, 64), (320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8),
        (1280, 16, 16), (1280, 32, 32), (640, 64, 64), (320, 64, 64), (4, 64, 64)]
    assert sum(s["parameters"] for s in stages) < sum(p.numel() for p in sd.parameters())
    fig = viz.draw_unet_diagram(stages, "SD v1")
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "down_blocks.2\n1280×8×8\nself + cross attention" in labels
    assert "up_blocks.0\n1280×16×16" in labels
    readable(fig)


def test_a_level_whose_attention_reads_only_the_prompt_is_named_so():
    from minisd.unet import UNet2DConditionConfig
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D",
                                                                     "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), only_cross_attention=(True, False),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2))
    stages = viz.unet_stages(unet, torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 16))
    assert {s["name"]: s["attention"] for s in stages}["down_blocks.0"] == "cross only"
    assert {s["name"]: s["attention"] for s in stages}["down_blocks.1"] == ""


def test_draw_self_attention_shows_the_row_of_each_query():
    weights = torch.softmax(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), -1)
    fig = viz.draw_self_attention(pictures(1, size=8)[0], weights, [(0, 1), (3, 2)])
    maps = [ax.get_images()[0] for ax in fig.axes[1:3]]
    np.testing.assert_allclose(np.asarray(maps[1].get_array()), weights[3 * 4 + 2].view(4, 4))
    assert maps[0].get_clim() == maps[1].get_clim()              # one shared scale …
    assert fig.axes[-1].get_ylabel() == "attention probability"   # … with its colour bar
    readable(fig)
    with pytest.raises(ValueError, match="off the 4×4 grid"):
        viz.draw_self_attention(pictures(1)[0], weights, [(4, 0)])
    with pytest.raises(ValueError, match="square grid"):
        viz.draw_self_attention(pictures(1)[0], weights[:, :15], [(0, 0)])


def test_draw_token_maps_give_every_map_a_colour_bar_from_zero_to_its_maximum():
    heat = torch.rand(2, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = SimpleNamespace(tokens=["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"],
                           image=pictures(1)[0], timesteps=torch.tensor([901, 1]),
                           token_map=lambda i, steps=None: heat[:, i].mean(0))
    fig = viz.draw_token_maps(maps, ncols=3)
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["picture", "start", "a", "red", "circle", "end"]
    for k, ax in enumerate(panels[1:]):
        image = ax.get_images()[0]
        np.testing.assert_allclose(image.get_array(), heat[:, k].mean(0))
        assert image.get_clim() == (0.0, pytest.approx(float(heat[:, k].mean(0).max())))
    bars = [ax for ax in fig.axes if ax not in panels and ax.get_yticklabels()]
    assert len(bars) == 5
    assert [t.get_text() for t in bars[2].get_yticklabels()] == \
        ["0", f"{float(heat[:, 2].mean(0).max()):.2f}"]
    readable(fig)
    one = viz.draw_cross_attention(maps, 2, step=1)
    assert one.axes[1].get_title() == "“red”, step 1, t = 1"
    readable(one)


def test_draw_autoencoder_counts_the_numbers():
    fig = viz.draw_autoencoder(pictures(1, size=16)[0], torch.randn(4, 4, 4), pictures(1, 16)[0])
    texts = [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes]
    assert "a picture:\n768 numbers" in texts
    assert "its latent: 64 numbers\n(4 small maps)" in texts
    readable(fig)
