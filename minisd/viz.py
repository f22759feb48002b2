"""Plots and widgets for the notebooks (matplotlib and ipywidgets).

Every widget is a thin shell around a `draw_*` function that takes plain values and
returns a matplotlib Figure, so the picture is testable without a front end. `interactive`
shows the widget in a Jupyter kernel, stores the picture at the controls' starting values
beside it for readers who open the notebook without running it, and degrades to that static
picture anywhere else.

Figures are at most 8.5 inches wide (850 pixels at matplotlib's 100 dpi, the width of a
JupyterLab output area in a 1280-pixel window), so they are shown at their own size with
readable text; tests/test_viz*.py check that no two of their texts overlap.
"""

import textwrap
from itertools import pairwise

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from minisd.schedulers import sigmas_from_alphas_cumprod
from minisd.shapes.evaluate import score
from minisd.shapes.world import Prompt

MAX_WIDTH = 8.5   # inches: the widest figure shown at its own size in JupyterLab


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


def _figure_size(width: float, height: float) -> tuple[float, float]:
    """(width, height) in inches, scaled down together to at most MAX_WIDTH wide."""
    scale = min(1.0, MAX_WIDTH / width)
    return width * scale, height * scale


def _bare(ax) -> None:
    """An axes for a picture: no ticks, no frame, but room for a y label (a row's name)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(False)


def show_images(images, titles=None, ncols: int | None = None, size: float = 2.0,
                title: str | None = None):
    """Draw pictures (each (3, H, W) in [−1, 1]) in a grid, row by row; returns the Figure.

    titles: one per picture (may hold line breaks); title: one for the whole figure, kept
    clear of the pictures' titles. Scaled down to at most MAX_WIDTH inches wide.
    """
    images = list(images)
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    width, _ = _figure_size(size * ncols, 1.0)
    if titles:          # wrap each title to its picture's width (about 15 characters an inch)
        titles = ["\n".join(textwrap.fill(line, max(6, int(13 * width / ncols)))
                            for line in str(t).split("\n")) for t in titles]
    lines = max((t.count("\n") + 1 for t in titles), default=0) if titles else 0
    height = (width / ncols + 0.17 * lines) * nrows + 0.3 * bool(title)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(width, height))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_image(images[i]), interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def show_image_grid(rows: dict, column_titles=None, size: float = 1.2,
                    title: str | None = None, label_width: int = 22):
    """Pictures in a table: one row per entry of `rows` ({label: pictures}), each picture
    (3, H, W) in [−1, 1]; the label (wrapped to `label_width` characters) on the left of its
    row, `column_titles` above the first row, `title` above everything. Rows may be shorter
    than the longest (their last cells stay empty). Returns the Figure, at most MAX_WIDTH
    inches wide. Raises ValueError for no rows or a column title count that does not match.
    """
    if not rows:
        raise ValueError("no rows to draw")
    ncols = max(len(pictures) for pictures in rows.values())
    if column_titles is not None and len(column_titles) != ncols:
        raise ValueError(f"{len(column_titles)} column titles for {ncols} columns")
    label_inches = 0.075 * label_width
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False, layout="constrained",
                             figsize=_figure_size(label_inches + size * ncols,
                                                  (size + 0.1) * len(rows) + 0.25
                                                  + 0.3 * bool(title)))
    for r, (axes_row, (label, pictures)) in enumerate(zip(axes, rows.items())):
        for c, ax in enumerate(axes_row):
            _bare(ax)
            if c < len(pictures):
                ax.imshow(to_image(pictures[c]), interpolation="nearest")
            if r == 0 and column_titles is not None:
                ax.set_title(column_titles[c], fontsize=8)
        axes_row[0].set_ylabel(textwrap.fill(str(label), label_width), fontsize=8, rotation=0,
                               ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw_diffusion(pictures, titles, arrows, size: float = 1.3, title: str | None = None):
    """A strip of pictures with labelled arrows under it: forward diffusion (noise added,
    left to right) and the reverse process (noise removed) in one figure.

    pictures: (3, H, W) in [−1, 1]; titles: one per picture; arrows: [(text, direction)],
    direction "right" or "left", drawn one under the other. Returns the Figure.
    """
    pictures = list(pictures)
    n = len(pictures)
    fig, axes = plt.subplots(1, n, squeeze=False,
                             figsize=_figure_size(size * n, size + 0.35 + 0.42 * len(arrows)
                                                  + 0.3 * bool(title)))
    top = 1 - (0.32 + 0.3 * bool(title)) / fig.get_figheight()
    bottom = 0.42 * len(arrows) / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.06)
    for ax, picture, text in zip(axes[0], pictures, titles):
        ax.imshow(to_image(picture), interpolation="nearest")
        ax.set_title(text, fontsize=8)
        ax.axis("off")
    for k, (text, direction) in enumerate(arrows):
        y = (bottom - 0.42 * (k + 0.62) / fig.get_figheight())
        start, end = (0.03, 0.97) if direction == "right" else (0.97, 0.03)
        fig.add_artist(FancyArrowPatch((start, y), (end, y), transform=fig.transFigure,
                                       arrowstyle="-|>", mutation_scale=14, lw=1.4,
                                       color=f"C{k}"))
        fig.text(0.5, y + 0.06 / fig.get_figheight(), text, ha="center", va="bottom",
                 fontsize=9, color=f"C{k}", backgroundcolor="white")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_schedules(schedules: dict):
    """β_t, ᾱ_t and the SNR (log axis) of several `NoiseSchedule`s, one line each."""
    fig, axes = plt.subplots(1, 3, figsize=(MAX_WIDTH, 3.0), layout="constrained")
    for name, s in schedules.items():
        t = np.arange(s.num_train_timesteps)
        axes[0].plot(t, s.betas.numpy(), label=name)
        axes[1].plot(t, s.alphas_cumprod.numpy(), label=name)
        axes[2].semilogy(t, s.snr.numpy(), label=name)
    labels = [("β_t: noise added at step t", "variance added (no unit)"),
              ("ᾱ_t: signal kept at step t", "share of the variance"),
              ("SNR(t) = ᾱ_t / (1 − ᾱ_t)", "signal-to-noise ratio")]
    for ax, (title, ylabel) in zip(axes, labels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return fig


def draw_noised(x0: torch.Tensor, schedule, t: int, seed: int = 0):
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε for one picture x0 (3, H, W) in [−1, 1], with the
    histogram of its pixel values against those of x_0 and of pure noise N(0, 1)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xt = schedule.add_noise(x0[None], noise[None], t)[0]
    fig, (ax_img, ax_hist) = plt.subplots(1, 2, figsize=(7.5, 3.0), layout="constrained",
                                          gridspec_kw={"width_ratios": [1, 1.6]})
    ax_img.imshow(to_image(xt), interpolation="nearest")
    ax_img.set_title(f"x_t at t = {t}, ᾱ_t = {schedule.alphas_cumprod[t]:.4f}", fontsize=9)
    ax_img.axis("off")
    bins = np.linspace(-4, 4, 81)
    ax_hist.hist(x0.flatten().numpy(), bins=bins, alpha=0.5, density=True, label="x_0 (clean)")
    ax_hist.hist(xt.flatten().numpy(), bins=bins, alpha=0.5, density=True, label="x_t")
    grid = np.linspace(-4, 4, 200)
    ax_hist.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    ax_hist.set_title("pixel values", fontsize=9)
    ax_hist.set_xlabel("value (pictures live in [−1, 1])")
    ax_hist.set_ylabel("density")
    ax_hist.legend(fontsize=8)
    return fig


def in_jupyter_kernel() -> bool:
    """True when running inside a Jupyter (IPython) kernel that can show widgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def widget_bundle(widget, figure, names) -> dict:
    """The display data of a widget with a picture to stand in for it: the widget's own view
    (drawn by a live front end), the Figure as a PNG (what a notebook opened without running
    it shows: JupyterLab draws widgets only in trusted notebooks) and a line of text instead
    of the widget's repr. names: the controls' names, for that line."""
    from IPython.core.pylabtools import print_figure

    bundle = {key: value for key, value in widget._repr_mimebundle_().items()
              if key != "text/plain"}
    bundle["image/png"] = print_figure(figure, "png", base64=True)
    bundle["text/plain"] = (f"[a widget with controls {', '.join(names)}: run the cell to use "
                            "it; the picture shows their starting values]")
    return bundle


def interactive(draw, **controls):
    """Show `draw(**values)` with one ipywidgets control per keyword argument.

    In a Jupyter kernel this displays the controls over the picture and redraws it on every
    change; the output also stores the picture at the controls' starting values
    (`widget_bundle`), so a saved notebook shows a picture, never a widget's repr. Elsewhere it
    draws once at the starting values and returns that Figure (a static picture).
    """
    first = draw(**{name: control.value for name, control in controls.items()})
    if not in_jupyter_kernel():
        return first
    import ipywidgets
    from IPython.display import display

    plt.close(first)                        # shown once, by the widget, not again at cell end
    pending = [first]

    def redraw(**values):
        figure = pending.pop() if pending else draw(**values)
        display(figure)
        plt.close(figure)

    widget = ipywidgets.interactive(redraw, **controls)
    display(widget_bundle(widget, first, list(controls)), raw=True)
    return None


def grid_sigmas(scheduler) -> torch.Tensor:
    """The noise level σ = √((1 − ᾱ)/ᾱ) at each grid point of a scheduler and after its last
    step: float32 (n + 1,), after `set_timesteps(n)`.

    Read from `scheduler.sigmas` for the σ schedulers (Euler, Euler ancestral, DPM-Solver++),
    from ᾱ at the grid timesteps and `final_alpha_cumprod` for DDPM and DDIM, so every
    scheduler is drawn on the same axis. Raises ValueError before set_timesteps.
    """
    if scheduler.timesteps is None:
        raise ValueError(f"call set_timesteps(n) on the {type(scheduler).__name__} first")
    if getattr(scheduler, "sigmas", None) is not None:
        return scheduler.sigmas.float()
    t = scheduler.timesteps.cpu().long()
    alphas = torch.cat([scheduler.alphas_cumprod[t].double(),
                        torch.tensor([scheduler.final_alpha_cumprod], dtype=torch.float64)])
    return sigmas_from_alphas_cumprod(alphas).float()


def plot_scheduler_grids(schedulers: dict, num_inference_steps: int):
    """Where each scheduler samples: its timesteps (left) and noise levels σ (right, σ after
    the last step included, symmetric-log axis so that σ = 0 shows) against the step index,
    one line per scheduler. Calls `set_timesteps(num_inference_steps)` on each.

    schedulers: {label: scheduler}. Returns the Figure.
    """
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(MAX_WIDTH, 3.2), layout="constrained")
    for k, (name, s) in enumerate(schedulers.items()):
        s.set_timesteps(num_inference_steps)
        marker = "os^vDx*"[k % 7]
        ax_t.plot(s.timesteps.cpu().float().numpy(), marker=marker, label=name, alpha=0.8)
        ax_s.plot(grid_sigmas(s).numpy(), marker=marker, label=name, alpha=0.8)
    ax_t.set_title(f"which timestep each of the {num_inference_steps} steps uses", fontsize=9)
    ax_t.set_ylabel("timestep t (0 = clean, 999 = noise)", fontsize=8)
    ax_s.set_title("noise level σ before each step, and after the last", fontsize=9)
    ax_s.set_ylabel("σ (noise std / signal std)", fontsize=8)
    ax_s.set_yscale("symlog", linthresh=0.01)
    for ax in (ax_t, ax_s):
        ax.set_xlabel("step i")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    return fig


def draw_trajectories(trajectories: dict, size: float = 1.0):
    """Image strips: one row per scheduler, one picture per step.

    trajectories: {label: (timesteps, pictures)}, pictures (3, H, W) in [−1, 1] (e.g. the
    decoded x̂_0 of every step), each row titled by its timesteps. Rows may differ in length.
    Returns the Figure, at most MAX_WIDTH inches wide.
    """
    ncols = max(len(pictures) for _, pictures in trajectories.values())
    fig, axes = plt.subplots(len(trajectories), ncols, squeeze=False, layout="constrained",
                             figsize=_figure_size(size * ncols + 1.2,
                                                  (size + 0.25) * len(trajectories)))
    for row, (name, (timesteps, pictures)) in zip(axes, trajectories.items()):
        for i, ax in enumerate(row):
            _bare(ax)
            if i < len(pictures):
                ax.imshow(to_image(pictures[i]), interpolation="nearest")
                ax.set_title(f"t={float(timesteps[i]):g}", fontsize=7)
        row[0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    return fig


def draw_latent_interpolation(vae, a: torch.Tensor, b: torch.Tensor, t: float):
    """Blend two pictures in pixel space and in a VAE's latent space, one row each.

    Top row: a, the pixel crossfade (1 − t)·a + t·b, b. Bottom row: the decoded posterior
    means μ_a, decode((1 − t)·μ_a + t·μ_b), μ_b (`vae` a `minisd.vae.AutoencoderKL`). a, b:
    (3, H, W) in [−1, 1], H and W multiples of the VAE's downsampling factor; t in [0, 1].
    Returns the Figure. Raises ValueError for t outside [0, 1] (and as `vae.encode` does).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    with torch.no_grad():
        device = next(vae.parameters()).device
        means = vae.encode(torch.stack([a, b]).to(device)).mode()
        blended = torch.stack([means[0], torch.lerp(means[0], means[1], t), means[1]])
        decoded = vae.decode(blended).cpu()
    return show_image_grid({"mixing pixels": [a, torch.lerp(a, b, t), b],
                            "mixing latents, then decoding": list(decoded)},
                           column_titles=["a (t = 0)", f"t = {t:.2f}", "b (t = 1)"],
                           size=1.5, label_width=16)


def draw_autoencoder(picture: torch.Tensor, latents: torch.Tensor, reconstruction: torch.Tensor):
    """What a VAE does, in one figure: a picture → the encoder → its latent (each channel a
    small map) → the decoder → the picture drawn back.

    picture, reconstruction: (3, H, W) in [−1, 1]; latents: (C, h, w), C ≤ 4 channels (drawn
    on one shared blue–red scale, blue negative). Titles count the numbers in each. Returns
    the Figure.
    """
    channels = latents.shape[0]
    fig = plt.figure(figsize=(MAX_WIDTH, 2.7))
    outer = fig.add_gridspec(1, 5, width_ratios=[2, 0.8, 2, 0.8, 2], left=0.01, right=0.99,
                             bottom=0.03, top=0.8, wspace=0.08)
    for column, image, title in [(0, picture, "a picture"), (4, reconstruction, "drawn back")]:
        ax = fig.add_subplot(outer[column])
        ax.imshow(to_image(image), interpolation="nearest")
        ax.set_title(f"{title}:\n{image.numel():,} numbers", fontsize=9)
        ax.axis("off")
    side = 2 if channels > 1 else 1
    inner = outer[2].subgridspec(side, side, wspace=0.06, hspace=0.06)
    limit = float(latents.abs().max())
    for c in range(channels):
        ax = fig.add_subplot(inner[c // side, c % side])
        ax.imshow(latents[c].detach().float().cpu().numpy(), cmap="RdBu_r", vmin=-limit,
                  vmax=limit, interpolation="nearest")
        ax.axis("off")
    fig.text(0.5, 0.84, f"its latent: {latents.numel():,} numbers\n({channels} small maps)",
             ha="center", va="bottom", fontsize=9)
    for column, label in [(1, "encoder"), (3, "decoder")]:
        box = outer[column].get_position(fig)
        y = (box.y0 + box.y1) / 2
        fig.add_artist(FancyArrowPatch((box.x0, y), (box.x1, y), transform=fig.transFigure,
                                       arrowstyle="-|>", mutation_scale=16, lw=1.6))
        fig.text((box.x0 + box.x1) / 2, y + 0.05, label, ha="center", va="bottom", fontsize=9)
    return fig


def draw_noise_prediction(pipe, picture: torch.Tensor, prompt: str, t: int, seed: int = 0):
    """What the U-Net does, in one figure: a picture is encoded and noised to timestep t; the
    U-Net, told t and the prompt, predicts the noise; removing that noise gives its guess of
    the clean picture.

    pipe: a `StableDiffusionPipeline`; picture: (3, H, W) in [−1, 1] of the pipeline's size;
    t: an integer timestep of its scheduler. Works for ε-, v- and x_0-predicting U-Nets (the
    scheduler's `prediction_type`). Panels: the picture, the noisy latents decoded, the first
    latent channel of the true and of the predicted noise (grey, ±3 std), and the decoded
    guess. Returns the Figure. Raises ValueError for a t outside the schedule.
    """
    schedule = pipe.scheduler
    if not 0 <= t < len(schedule.alphas_cumprod):
        raise ValueError(f"t must be in 0…{len(schedule.alphas_cumprod) - 1}, got {t}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = pipe.vae.encode_latents(picture[None].to(pipe.device, pipe.dtype), generator)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        zt = schedule.add_noise(z0, noise, torch.tensor([t]))
        context = pipe.text_encoder(pipe.tokenizer([prompt]).to(pipe.device)).last_hidden_state
        out = pipe.unet(zt, t, context)
        a = schedule.alphas_cumprod[t].to(zt)
        kind = schedule.config.prediction_type
        if kind == "v_prediction":
            guess = a.sqrt() * zt - (1 - a).sqrt() * out            # Salimans & Ho 2022, §4
            predicted = a.sqrt() * out + (1 - a).sqrt() * zt
        elif kind == "sample":
            guess, predicted = out, (zt - a.sqrt() * out) / (1 - a).sqrt()
        else:
            guess, predicted = (zt - (1 - a).sqrt() * out) / a.sqrt(), out
        noisy, cleaned = pipe.decode(torch.cat([zt, guess]), output_type="pt") * 2 - 1
    grey = [n[0, :1].cpu() / 3 for n in (noise, predicted)]
    return show_images([picture, noisy, grey[0], grey[1], cleaned],
                       titles=["the picture", f"noised to t = {t}",
                               "the noise added\n(one map of 4)", "the noise the U-Net\npredicts",
                               "noisy minus prediction:\nits guess"],
                       size=1.6, title=f"prompt: “{prompt}”")


def unet_stages(unet, sample: torch.Tensor, context: torch.Tensor, timestep=500) -> list[dict]:
    """Run `unet` once and report each stage: conv_in, every down block, the mid block,
    every up block, conv_out.

    sample (B, C, H, W) and context (B, M, D) as the U-Net takes them, on the U-Net's device
    (the `meta` device works: shapes without memory). Returns one dict per stage: name,
    output shape (a tuple), the attention it holds ("self + cross", "cross only" when both
    attention layers read the prompt, or "" for none), its resolution level (0 = the latent's
    size) and its parameter count.
    """
    stages = [("conv_in", unet.conv_in, 0)]
    stages += [(f"down_blocks.{i}", b, i) for i, b in enumerate(unet.down_blocks)]
    levels = len(unet.down_blocks)
    stages += [("mid_block", unet.mid_block, levels)]
    stages += [(f"up_blocks.{i}", b, levels - 1 - i) for i, b in enumerate(unet.up_blocks)]
    stages += [("conv_out", unet.conv_out, 0)]
    rows, hooks = [], []
    for name, module, level in stages:
        attentions = getattr(module, "attentions", None)
        attention = ""
        if attentions:
            only_cross = attentions[0].transformer_blocks[0].only_cross_attention
            attention = "cross only" if only_cross else "self + cross"

        def record(module, inputs, output, name=name, level=level, attention=attention):
            output = output[0] if isinstance(output, tuple) else output
            rows.append({"name": name, "shape": tuple(output.shape), "attention": attention,
                         "level": level,
                         "parameters": sum(p.numel() for p in module.parameters())})
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            unet(sample, timestep, context)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def draw_unet_diagram(stages: list[dict], title: str = "", size: float = 1.0):
    """A block diagram of a U-Net from `unet_stages`: the down path on the left, the mid
    block at the bottom, the up path on the right, skip connections across; each box names
    its stage, the shape of what it outputs (channels × height × width) and its attention.
    Orange boxes hold attention, blue ones only ResNet blocks. Returns the Figure."""
    downs = [s for s in stages if s["name"].startswith("down")]
    levels = len(downs)
    width = 2 * levels + 3
    fig, ax = plt.subplots(figsize=_figure_size(width * 0.95 * size, (levels + 2.6) * 0.95 * size))
    places = {}
    for s in stages:
        name, level = s["name"], s["level"]
        if name == "conv_in":
            places[name] = (0.0, 1.0)
        elif name == "conv_out":
            places[name] = (width - 1.0, 1.0)
        elif name == "mid_block":
            places[name] = ((width - 1) / 2, -levels)
        elif name.startswith("down"):
            places[name] = (0.6 + 0.45 * level, -level)
        else:
            places[name] = (width - 1.6 - 0.45 * level, -level)
    for s in stages:
        x, y = places[s["name"]]
        colour = "#fdd9a0" if s["attention"] else ("#e3e3e3" if "conv" in s["name"] else "#cfe3f7")
        ax.add_patch(FancyBboxPatch((x - 0.78, y - 0.33), 1.56, 0.66, boxstyle="round,pad=0.02",
                                    fc=colour, ec="0.4", lw=0.8))
        shape = "×".join(str(d) for d in s["shape"][1:])
        extra = f"\n{s['attention']} attention" if s["attention"] else ""
        ax.text(x, y, f"{s['name']}\n{shape}{extra}", ha="center", va="center", fontsize=7)
    order = [s["name"] for s in stages]
    for a, b in pairwise(order):
        (x0, y0), (x1, y1) = places[a], places[b]
        step = 0.33 if y1 > y0 else -0.33                 # leave a box by its top or bottom
        ax.add_patch(FancyArrowPatch((x0, y0 + step), (x1, y1 - step), arrowstyle="-|>",
                                     mutation_scale=10, lw=1, color="0.3", shrinkA=0,
                                     shrinkB=0))
    ups = [s for s in stages if s["name"].startswith("up")]
    for down in downs:
        up = next(u for u in ups if u["level"] == down["level"])
        (x0, y), (x1, _) = places[down["name"]], places[up["name"]]
        ax.add_patch(FancyArrowPatch((x0 + 0.8, y), (x1 - 0.8, y), arrowstyle="-|>",
                                     mutation_scale=9, lw=0.9, ls="--", color="0.55"))
    left, right = places["down_blocks.0"][0], places[ups[-1]["name"]][0]
    ax.text((left + right) / 2, 0.08, "skip connections", ha="center", va="bottom", fontsize=7,
            color="0.45")
    last = stages[-1]["shape"]          # the noise has the shape of the noisy latent
    ax.text(0.0, 1.55, f"noisy latent, {'×'.join(map(str, last[1:]))}", ha="center", fontsize=8)
    ax.text(width - 1.0, 1.55, f"predicted noise, {'×'.join(map(str, last[1:]))}",
            ha="center", fontsize=8)
    ax.text((width - 1) / 2, 1.0, "timestep t → a vector added in every ResNet block\n"
            "prompt → context vectors read by every attention block", ha="center",
            va="center", fontsize=7.5, color="0.25")
    ax.set_xlim(-0.9, width - 0.1)
    ax.set_ylim(-levels - 0.5, 1.9)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_loss_curve(losses, window: int = 100, title: str = "training loss"):
    """The loss of every step (faint) and its moving average over `window` steps, log y
    axis. losses: a sequence of floats. Returns the Figure. Raises ValueError when empty."""
    losses = np.asarray(list(losses), dtype=np.float64)
    if losses.size == 0:
        raise ValueError("no losses to draw")
    window = max(1, min(window, losses.size))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(np.arange(losses.size), losses, alpha=0.25, lw=0.8, label="per step")
    ax.plot(np.arange(window - 1, losses.size), smooth, lw=1.8,
            label=f"mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def draw_sample(pipe, prompt, scheduler: str = "dpmpp_2m", num_inference_steps: int = 20,
                guidance_scale: float = 7.5, seed: int = 0, size: float = 3.0):
    """Generate one picture with `pipe` (a StableDiffusionPipeline) and show it.

    Args:
        prompt: a caption, or a `minisd.shapes.world.Prompt`, whose picture is then read by the judge
            (`minisd.shapes.evaluate.score`) and the verdict is written under it.
        scheduler: a name of `minisd.schedulers.SCHEDULERS`; num_inference_steps,
            guidance_scale, seed: as for the pipeline (no progress bar).
    Returns the Figure. Raises what the pipeline raises (e.g. ValueError for an unknown
    scheduler name, listing the known ones).
    """
    caption = prompt.caption if isinstance(prompt, Prompt) else prompt
    images = pipe(caption, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, seed=seed, scheduler=scheduler,
                  output_type="pt", progress=False).images
    picture = images[0] * 2 - 1                                   # [0, 1] → [−1, 1]
    fig, ax = plt.subplots(figsize=(size, size + 0.6))
    ax.imshow(to_image(picture), interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"“{caption}”\n{scheduler}, {num_inference_steps} steps, s = {guidance_scale:g}, "
                 f"seed {seed}", fontsize=8)
    if isinstance(prompt, Prompt):
        verdict = score(picture, prompt)
        wrong = [name for name, ok in verdict.items() if not ok and name != "overall"]
        ax.text(0.5, -0.04, "judge: all right" if verdict["overall"]
                else "judge: wrong " + ", ".join(wrong),
                transform=ax.transAxes, ha="center", va="top", fontsize=8)
    fig.tight_layout()
    return fig


def _attention_title(maps, step) -> str:
    if step is None:
        return f"mean of {len(maps.timesteps)} steps"
    return f"step {step}, t = {float(maps.timesteps[step]):g}"


def _token_label(token: str) -> str:
    return token.strip().replace("<|startoftext|>", "start").replace("<|endoftext|>", "end")


def draw_token_maps(maps, steps=None, size: float = 1.3, ncols: int = 5):
    """The picture and the cross-attention map of every token of its prompt, `ncols` panels
    a row, each map with its own colour bar.

    maps: a `minisd.attention_maps.CrossAttentionMaps`; steps: which steps to average
    (None: all). The values are attention probabilities: the share of a pixel's attention that
    goes to the token, averaged over heads, layers and steps. Each map has its own scale (the
    start token takes far more than the words), from 0 to its maximum, both marked on its
    colour bar. Returns the Figure.
    """
    heats = [maps.token_map(i, steps).numpy() for i in range(len(maps.tokens))]
    nrows = -(-(len(heats) + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=_figure_size((size + 0.45) * ncols, (size + 0.35) * nrows))
    axes = axes.ravel()
    axes[0].imshow(to_image(maps.image), interpolation="nearest")
    axes[0].set_title("picture", fontsize=9)
    for ax, heat, token in zip(axes[1:], heats, maps.tokens):
        top = float(heat.max())
        shown = ax.imshow(heat, cmap="inferno", vmin=0.0, vmax=top)
        ax.set_title(_token_label(token), fontsize=9)
        bar = fig.colorbar(shown, ax=ax, fraction=0.08, pad=0.03, ticks=[0.0, top])
        bar.ax.set_yticklabels(["0", f"{top:.2f}"], fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("attention probability of each token (each map on its own scale)", fontsize=9)
    return fig


def draw_cross_attention(maps, token: int, step: int | None = None):
    """One token's cross-attention map at one denoising step (None: averaged over all),
    beside the picture and laid over it, with a colour bar in attention probability.
    maps: a `CrossAttentionMaps`; token: its index in `maps.tokens`. Raises IndexError for a
    token or step out of range. Returns the Figure."""
    if step is not None and not 0 <= step < len(maps.timesteps):
        raise IndexError(f"step {step} out of range for {len(maps.timesteps)} steps")
    heat = maps.token_map(token, step).numpy()
    picture = to_image(maps.image)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9), layout="constrained")
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("picture", fontsize=9)
    shown = axes[1].imshow(heat, cmap="inferno", vmin=0)
    bar = fig.colorbar(shown, ax=axes[1], fraction=0.046)
    bar.set_label("attention probability", fontsize=8)
    axes[1].set_title(f"“{_token_label(maps.tokens[token])}”, {_attention_title(maps, step)}",
                      fontsize=9)
    axes[2].imshow(picture, interpolation="nearest")
    axes[2].imshow(heat, cmap="inferno", alpha=0.6)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return fig


def draw_self_attention(picture: torch.Tensor, weights: torch.Tensor, queries, size: float = 2.0):
    """Self-attention seen from a few pixels: where does each one look?

    picture: (3, H, W) in [−1, 1]; weights: (h·w, h·w) attention probabilities of one
    self-attention layer (rows: the querying pixel, columns: the pixels it reads, row-major
    over the layer's h×w grid, h and w dividing H and W), e.g. averaged over heads; queries:
    [(row, column)] in the layer's grid. Panels: the picture with each query marked, then one
    map per query on a shared colour scale, the query marked. Returns the Figure. Raises
    ValueError when `weights` is not square or not a square grid, or a query is off the grid.
    """
    weights = weights.detach().float().cpu()
    n = weights.shape[0]
    h = round(n ** 0.5)
    if weights.ndim != 2 or weights.shape[1] != n or h * h != n:
        raise ValueError(f"weights must be (h·w, h·w) over a square grid, got "
                         f"{tuple(weights.shape)}")
    for row, col in queries:
        if not (0 <= row < h and 0 <= col < h):
            raise ValueError(f"query {(row, col)} is off the {h}×{h} grid")
    H, W = picture.shape[-2:]
    scale = (H / h, W / h)
    fig, axes = plt.subplots(1, len(queries) + 1, squeeze=False, layout="constrained",
                             figsize=_figure_size(size * (len(queries) + 1) + 0.9, size + 0.4))
    axes = axes[0]
    axes[0].imshow(to_image(picture), interpolation="nearest")
    axes[0].set_title("picture and query pixels", fontsize=8)
    vmax = max(float(weights[row * h + col].max()) for row, col in queries)
    for k, (ax, (row, col)) in enumerate(zip(axes[1:], queries)):
        x, y = (col + 0.5) * scale[1] - 0.5, (row + 0.5) * scale[0] - 0.5
        axes[0].plot(x, y, marker="+", ms=14, mew=2.5, color=f"C{k}")
        shown = ax.imshow(weights[row * h + col].view(h, h).numpy(), cmap="viridis", vmin=0,
                          vmax=vmax, extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        ax.plot(x, y, marker="+", ms=14, mew=2.5, color=f"C{k}")
        ax.set_title(f"where query {k + 1} looks", fontsize=8)
    for ax in axes:
        ax.axis("off")
    bar = fig.colorbar(shown, ax=list(axes[1:]), shrink=0.9)
    bar.set_label("attention probability", fontsize=8)
    return fig


def draw_similarity(similarity: torch.Tensor, pictures, captions, size: float = 0.7):
    """An (N_text, N_image) similarity matrix as a heatmap: the pictures (each (3, H, W) in
    [−1, 1]) above their columns, the captions beside their rows, each row's best picture
    outlined. Raises ValueError if the sizes disagree. Returns the Figure."""
    similarity = similarity.detach().float().cpu()
    pictures, captions = list(pictures), list(captions)
    if similarity.shape != (len(captions), len(pictures)):
        raise ValueError(f"similarity has shape {tuple(similarity.shape)}, expected "
                         f"({len(captions)} captions, {len(pictures)} pictures)")
    n_text, n_image = similarity.shape
    size = min(size, (MAX_WIDTH - 3.2) / n_image)
    fig = plt.figure(figsize=(3.2 + size * n_image, size * (n_text + 1.2)))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n_text], hspace=0.05,
                            left=2.9 / (3.2 + size * n_image), right=0.98, top=0.98,
                            bottom=0.45 / (size * (n_text + 1.2)))
    strip = fig.add_subplot(grid[0])
    strip.imshow(np.concatenate([to_image(p) for p in pictures], axis=1),
                 interpolation="nearest", extent=(-0.5, n_image - 0.5, 0, 1), aspect="auto")
    strip.axis("off")
    heat = fig.add_subplot(grid[1])
    heat.imshow(similarity.numpy(), cmap="viridis", aspect="auto")
    for row, col in enumerate(similarity.argmax(dim=1).tolist()):
        heat.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=2))
        for c in range(n_image):
            heat.text(c, row, f"{similarity[row, c]:.0f}", ha="center", va="center",
                      fontsize=7, color="white")
    heat.set_yticks(range(n_text), [textwrap.shorten(c, 42) for c in captions], fontsize=8)
    heat.set_xticks([])
    heat.set_xlabel("the picture above each column; in each cell, the caption–picture score",
                    fontsize=8)
    return fig


def draw_prompt_matches(prompt: str, tokenizer, model, pictures: torch.Tensor,
                        image_embeds: torch.Tensor, k: int = 6):
    """A prompt's tokens and the `k` pictures a CLIP model finds most similar to it.

    prompt: any text; tokenizer: a `CLIPTokenizer`; model: a `CLIPModel`; pictures
    (N, 3, H, W) in [−1, 1] with their unit image vectors image_embeds (N, P) (from
    `model.get_image_features`, normalised). The title lists each piece with its id; each
    picture is titled with its cosine similarity. Raises ValueError if k is not in 1…N or
    the two tensors disagree in N. Returns the Figure.
    """
    if len(pictures) != len(image_embeds):
        raise ValueError(f"{len(pictures)} pictures but {len(image_embeds)} image vectors")
    if not 1 <= k <= len(pictures):
        raise ValueError(f"k={k}; choose 1…{len(pictures)}")
    ids = tokenizer(prompt)                                                # (1, 77)
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.get_text_features(ids), dim=-1)[0]
    scores, best = (image_embeds.float() @ text.float()).topk(k)
    pieces = [f"{piece.replace('</w>', '_')}:{i}"
              for piece, i in zip(tokenizer.tokenize(prompt), tokenizer.encode(prompt))]
    header = (f"{len(pieces)} tokens + BOS/EOS, padded to {ids.shape[1]}:  "
              + "  ".join(pieces[:30]) + (" …" if len(pieces) > 30 else ""))
    fig, axes = plt.subplots(1, k, figsize=_figure_size(1.4 * k, 2.6), squeeze=False,
                             layout="constrained")
    for ax, value, index in zip(axes[0], scores.tolist(), best.tolist()):
        ax.imshow(to_image(pictures[index]), interpolation="nearest")
        ax.set_title(f"#{index}: {value:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(textwrap.fill(header, int(14 * fig.get_figwidth())), fontsize=9)
    return fig


def draw_text_to_image(pipe, prompt: str, negative_prompt: str = "",
                       num_inference_steps: int | None = None, guidance_scale: float | None = None,
                       seed: int = 0, scheduler: str | None = None, num_previews: int = 4,
                       size: float = 1.5):
    """Generate one picture with `pipe` (a StableDiffusionPipeline) and show it after the
    model's guess of it, x̂_0, at `num_previews` steps spread evenly over the run (from the
    first to the last step), each titled with its timestep t.

    Args:
        prompt, negative_prompt, num_inference_steps, guidance_scale, seed: as for the
            pipeline (CPU noise from `seed`, no progress bar); steps and guidance None for the
            model's own (`pipe.sampling_defaults`).
        scheduler: a name of `minisd.schedulers.SCHEDULERS`, or None for the pipeline's own.
        num_previews: x̂_0 panels, ≥ 0 (fewer when there are fewer steps).
    Returns the Figure: the previews, then the picture at twice their size, titled with the
    prompt and the settings. Raises ValueError for num_previews < 0, and what the pipeline
    raises (e.g. ValueError for an unknown scheduler name, listing the known ones).
    """
    if num_previews < 0:
        raise ValueError(f"num_previews must be ≥ 0, got {num_previews}")
    if num_inference_steps is None:
        num_inference_steps = pipe.sampling_defaults.num_inference_steps
    if guidance_scale is None:
        guidance_scale = pipe.sampling_defaults.guidance_scale
    timesteps, guesses, state = [], [], None
    for state in pipe.denoising_steps(prompt, negative_prompt,
                                      num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, seed=seed,
                                      scheduler=scheduler, progress=False):
        picks = np.linspace(0, state.num_steps - 1, num_previews).round()
        if state.step in picks:
            timesteps.append(float(state.timestep))
            guesses.append(state.pred_original_sample)
    # decode the final latents and the x̂_0 guesses; [0, 1] → [−1, 1]
    picture = pipe.decode(state.latents, output_type="pt")[0] * 2 - 1
    previews = pipe.decode(torch.cat(guesses), output_type="pt") * 2 - 1 if guesses else []
    fig, axes = plt.subplots(1, len(timesteps) + 1, squeeze=False, layout="constrained",
                             figsize=_figure_size(size * (len(timesteps) + 2), size * 2 + 0.7),
                             gridspec_kw={"width_ratios": [1] * len(timesteps) + [2]})
    axes = axes[0]
    for ax, t, guess in zip(axes, timesteps, previews):
        ax.imshow(to_image(guess), interpolation="nearest")
        ax.set_title(f"x̂_0 at t = {t:g}", fontsize=8)
    axes[-1].imshow(to_image(picture), interpolation="nearest")
    name = scheduler or type(pipe.scheduler).__name__
    negative = f", not “{negative_prompt}”" if negative_prompt else ""
    axes[-1].set_title(f"“{prompt}”{negative}\n{name}, {num_inference_steps} steps, "
                       f"s = {guidance_scale:g}, seed {seed}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return fig
