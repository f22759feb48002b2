"""Plots and widgets for the notebooks (matplotlib and ipywidgets).

Every widget is a thin shell around a `draw_*` function that takes plain values and
returns a matplotlib Figure, so the picture is testable without a front end. `interactive`
shows the widget in a Jupyter kernel and degrades to the static picture at the widgets'
default values anywhere else (case C24).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_image(x: torch.Tensor) -> np.ndarray:
    """A picture tensor (3, H, W) or (1, H, W) in [−1, 1] → a numpy array (H, W, 3) in [0, 1].

    Values outside [−1, 1] are clipped, never wrapped. Raises ValueError for other shapes
    or for non-finite values (a NaN picture must not silently turn black).
    """
    x = x.detach().float().cpu()
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a picture of shape (3, H, W) or (1, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the picture has NaN or infinite values")
    x = x.expand(3, -1, -1)
    return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def show_images(images, titles=None, ncols: int | None = None, size: float = 2.0):
    """Draw pictures (each (3, H, W) in [−1, 1]) in a grid; returns the Figure."""
    images = list(images)
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * bool(titles)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_image(images[i]), interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def plot_schedules(schedules: dict):
    """β_t, ᾱ_t and the SNR (log axis) of several `NoiseSchedule`s, one line each."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, s in schedules.items():
        t = np.arange(s.num_train_timesteps)
        axes[0].plot(t, s.betas.numpy(), label=name)
        axes[1].plot(t, s.alphas_cumprod.numpy(), label=name)
        axes[2].semilogy(t, s.snr.numpy(), label=name)
    for ax, title in zip(axes, ["β_t (noise added at step t)", "ᾱ_t (signal kept)",
                                "SNR = ᾱ_t / (1 − ᾱ_t)"]):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def draw_noised(x0: torch.Tensor, schedule, t: int, seed: int = 0):
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε for one picture x0 (3, H, W) in [−1, 1], with the
    histogram of its pixel values against those of x_0 and of pure noise N(0, 1)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xt = schedule.add_noise(x0[None], noise[None], t)[0]
    fig, (ax_img, ax_hist) = plt.subplots(1, 2, figsize=(8, 3.2),
                                          gridspec_kw={"width_ratios": [1, 1.6]})
    ax_img.imshow(to_image(xt), interpolation="nearest")
    ax_img.set_title(f"x_t, t = {t}, ᾱ_t = {schedule.alphas_cumprod[t]:.4f}")
    ax_img.axis("off")
    bins = np.linspace(-4, 4, 81)
    ax_hist.hist(x0.flatten().numpy(), bins=bins, alpha=0.5, density=True, label="x_0")
    ax_hist.hist(xt.flatten().numpy(), bins=bins, alpha=0.5, density=True, label="x_t")
    grid = np.linspace(-4, 4, 200)
    ax_hist.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    ax_hist.set_title("pixel values")
    ax_hist.legend()
    fig.tight_layout()
    return fig


def in_jupyter_kernel() -> bool:
    """True when running inside a Jupyter (IPython) kernel that can show widgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def interactive(draw, **controls):
    """Show `draw(**values)` with one ipywidgets control per keyword argument.

    In a Jupyter kernel this displays the widgets and redraws on every change; elsewhere it
    draws once at the controls' default values and returns that Figure (a static picture).
    """
    if not in_jupyter_kernel():
        return draw(**{name: control.value for name, control in controls.items()})
    import ipywidgets

    def redraw(**values):
        draw(**values)
        plt.show()

    ipywidgets.interact(redraw, **controls)
    return None
