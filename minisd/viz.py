"""Plots and widgets for the notebooks (matplotlib and ipywidgets).

Every widget is a thin shell around a `draw_*` function that takes plain values and
returns a matplotlib Figure, so the picture is testable without a front end. `interactive`
shows the widget in a Jupyter kernel and degrades to the static picture at the widgets'
default values anywhere else.
"""

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from minisd.schedulers import sigmas_from_alphas_cumprod
from minisd.shapes.evaluate import score
from minisd.shapes.world import Prompt


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
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 3.6))
    for k, (name, s) in enumerate(schedulers.items()):
        s.set_timesteps(num_inference_steps)
        marker = "os^vDx*"[k % 7]
        ax_t.plot(s.timesteps.cpu().float().numpy(), marker=marker, label=name, alpha=0.8)
        ax_s.plot(grid_sigmas(s).numpy(), marker=marker, label=name, alpha=0.8)
    ax_t.set_title(f"timestep t of each of the {num_inference_steps} steps")
    ax_s.set_title("σ before each step, and after the last")
    ax_s.set_yscale("symlog", linthresh=0.01)
    for ax in (ax_t, ax_s):
        ax.set_xlabel("step i")
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_trajectories(trajectories: dict, size: float = 1.0):
    """Image strips: one row per scheduler, one picture per step.

    trajectories: {label: (timesteps, pictures)}, pictures (3, H, W) in [−1, 1] (e.g. the
    decoded x̂_0 of every step), each row titled by its timesteps. Rows may differ in length.
    Returns the Figure.
    """
    ncols = max(len(pictures) for _, pictures in trajectories.values())
    fig, axes = plt.subplots(len(trajectories), ncols, squeeze=False,
                             figsize=(size * ncols + 1.2, (size + 0.25) * len(trajectories)))
    for row, (name, (timesteps, pictures)) in zip(axes, trajectories.items()):
        for i, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if i < len(pictures):
                ax.imshow(to_image(pictures[i]), interpolation="nearest")
                ax.set_title(f"t={float(timesteps[i]):g}", fontsize=7)
        row[0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def draw_latent_interpolation(vae, a: torch.Tensor, b: torch.Tensor, t: float):
    """Blend two pictures in pixel space and in a VAE's latent space, side by side.

    Panels: a; the pixel crossfade (1 − t)·a + t·b; decode((1 − t)·μ_a + t·μ_b), μ the
    posterior means of `vae.encode` (a `minisd.vae.AutoencoderKL`); b. a, b: (3, H, W) in
    [−1, 1], H and W multiples of the VAE's downsampling factor; t in [0, 1].
    Returns the Figure. Raises ValueError for t outside [0, 1] (and as `vae.encode` does).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    with torch.no_grad():
        device = next(vae.parameters()).device
        means = vae.encode(torch.stack([a, b]).to(device)).mode()
        blended = vae.decode(torch.lerp(means[0], means[1], t)[None])[0]
    return show_images([a, torch.lerp(a, b, t), blended, b],
                       titles=["a", f"pixels, t = {t:.2f}", f"latents, t = {t:.2f}", "b"])


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


def draw_token_maps(maps, steps=None, size: float = 1.6):
    """The picture and the cross-attention map of every token of its prompt, in a row.

    maps: a `minisd.attention_maps.CrossAttentionMaps`; steps: which steps to average
    (None: all). Each map is scaled to its own maximum (brighter: more attention). Returns
    the Figure.
    """
    n = len(maps.tokens)
    fig, axes = plt.subplots(1, n + 1, figsize=(size * (n + 1), size + 0.4))
    axes[0].imshow(to_image(maps.image), interpolation="nearest")
    axes[0].set_title("picture", fontsize=9)
    for i, ax in enumerate(axes[1:]):
        ax.imshow(maps.token_map(i, steps).numpy(), cmap="inferno")
        ax.set_title(maps.tokens[i].strip().replace("<|", "").replace("|>", ""), fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def draw_cross_attention(maps, token: int, step: int | None = None):
    """One token's cross-attention map at one denoising step (None: averaged over all),
    beside the picture and laid over it. maps: a `CrossAttentionMaps`; token: its index in
    `maps.tokens`. Raises IndexError for a token or step out of range. Returns the Figure."""
    if step is not None and not 0 <= step < len(maps.timesteps):
        raise IndexError(f"step {step} out of range for {len(maps.timesteps)} steps")
    heat = maps.token_map(token, step).numpy()
    picture = to_image(maps.image)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("picture", fontsize=9)
    shown = axes[1].imshow(heat, cmap="inferno")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[1].set_title(f"{maps.tokens[token].strip()!r}: {_attention_title(maps, step)}",
                      fontsize=9)
    axes[2].imshow(picture, interpolation="nearest")
    axes[2].imshow(heat, cmap="inferno", alpha=0.6)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
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
    fig = plt.figure(figsize=(3.2 + size * n_image, size * (n_text + 1.2)))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n_text], hspace=0.05,
                            left=2.9 / (3.2 + size * n_image), right=0.98, top=0.98,
                            bottom=0.2 / (n_text + 1.2))
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
    fig, axes = plt.subplots(1, k, figsize=(1.7 * k, 2.6), squeeze=False)
    for ax, value, index in zip(axes[0], scores.tolist(), best.tolist()):
        ax.imshow(to_image(pictures[index]), interpolation="nearest")
        ax.set_title(f"#{index}: {value:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(textwrap.fill(header, 24 * k), fontsize=9)
    fig.tight_layout()
    return fig


def draw_text_to_image(pipe, prompt: str, negative_prompt: str = "",
                       num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                       scheduler: str | None = None, num_previews: int = 4, size: float = 1.5):
    """Generate one picture with `pipe` (a StableDiffusionPipeline) and show it after the
    model's guess of it, x̂_0, at `num_previews` steps spread evenly over the run (from the
    first to the last step), each titled with its timestep t.

    Args:
        prompt, negative_prompt, num_inference_steps, guidance_scale, seed: as for the
            pipeline (CPU noise from `seed`, no progress bar).
        scheduler: a name of `minisd.schedulers.SCHEDULERS`, or None for the pipeline's own.
        num_previews: x̂_0 panels, ≥ 0 (fewer when there are fewer steps).
    Returns the Figure: the previews, then the picture at twice their size, titled with the
    prompt and the settings. Raises ValueError for num_previews < 0, and what the pipeline
    raises (e.g. ValueError for an unknown scheduler name, listing the known ones).
    """
    if num_previews < 0:
        raise ValueError(f"num_previews must be ≥ 0, got {num_previews}")
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
    fig, axes = plt.subplots(1, len(timesteps) + 1, squeeze=False,
                             figsize=(size * (len(timesteps) + 2), size * 2 + 0.7),
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
    fig.tight_layout()
    return fig
