"""The recipe of the bundled U-Net: Stable Diffusion's noise predictor, trained on the shapes world.

`python -m minisd.training unet` trains ε_θ(z_t, t, c) as latent diffusion does (Rombach et al.
2022, §3.3, eq. 2), on top of the bundled VAE and text encoder, which stay frozen:

1. encode the training set once: every picture through the VAE's encoder, a latent sampled
   from q(z | x) and scaled, z_0 = (z − shift_factor)·scaling_factor (B, 4, 16, 16), and
   every caption through the tokenizer and text encoder, whose `last_hidden_state`
   (B, 77, D) is the U-Net's context c. Both are cached in float16 under `cache_dir`,
   keyed by the weights and the data, so a rerun or a resumed run skips this step;
2. every training step (Ho et al. 2020, Algorithm 1): t ~ U{0, …, T−1} and ε ~ N(0, I)
   per sample, z_t = √ᾱ_t·z_0 + √(1 − ᾱ_t)·ε on SD v1's schedule (scaled_linear, β from
   0.00085 to 0.012, T = 1000), and the loss ‖ε − ε_θ(z_t, t, c)‖² (eq. 14, "L_simple");
3. with probability 0.1 a caption is replaced by the empty prompt's context, so the same
   network also predicts the unconditional noise that classifier-free guidance needs
   (Ho & Salimans 2022, §3.2, p_uncond);
4. the shared loop (`minisd.training.loop.train`): AdamW, warm-up + cosine, gradient clipping, an EMA
   of the weights (the EMA is what gets saved), progress bar, resumable checkpoints;
5. write `unet/` (diffusers layout, float16), `scheduler/scheduler_config.json` (DDIM on
   the training schedule, with SD v1's DDIM settings) and `model_index.json` into the model
   folder, and the loss curve as `unet_loss.png`.

The network (`bundled_unet_config`): three levels of 24, 48, 48 channels at 16×16, 8×8 and
4×4, one ResNet block per level, 0.9 M parameters. At 16×16 the transformer blocks attend
only to the text (`only_cross_attention`): self-attention over 256 pixel tokens took most of
a CPU training step, cross-attention to 77 words is cheap. 8×8 and the
4×4 middle have self- and cross-attention. On a 2-core CPU the number of optimisation steps
decides quality more than width, so the model is small and the run long.

`python -m minisd.training all` trains the whole bundled model in order — `vae`, `clip`,
`unet`, each with its own defaults — and leaves a complete diffusers folder.
"""

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import fields
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from minisd.checkpoints import LIBRARIES, MODEL_INDEX
from minisd.noise import NoiseSchedule
from minisd.package_data import BUNDLED_MODEL_NAME, data_dir
from minisd.schedulers import SD_V1_SCHEDULER_CONFIG, DDIMScheduler
from minisd.shapes.world import ShapesDataset
from minisd.text_encoder import CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.training.loop import (
    TARGETS,
    TrainConfig,
    build_parser,
    config_from_args,
    init_distributed,
    register,
    train,
)
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL

BUNDLED_FOLDER = data_dir() / BUNDLED_MODEL_NAME
UNCOND_PROB = 0.1  # p_uncond of Ho & Salimans 2022: share of captions replaced by ""
# SD v1's noise schedule and DDIM settings (scheduler_config.json of SD v1.x, DDIM keys)
SD_V1_SCHEDULE = {key: SD_V1_SCHEDULER_CONFIG[key] for key in
                  ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
SD_V1_DDIM = {**SD_V1_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False,
              "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}
CACHE_VERSION = 1  # bump when the cached encoding changes meaning


def bundled_unet_config(cross_attention_dim: int = 128,
                        block_out_channels: tuple[int, ...] = (24, 48, 48),
                        attention_head_dim: tuple[int, ...] = (1, 2, 2),
                        norm_num_groups: int = 8, sample_size: int = 16) -> UNet2DConditionConfig:
    """The bundled U-Net's configuration (module docstring): latents (B, 4, 16, 16), levels
    of `block_out_channels` with cross-attention blocks at the first two and a plain block at
    the last; `only_cross_attention` at the first level; heads per level
    `attention_head_dim` (diffusers reads it as the number of heads); the context width
    `cross_attention_dim` is the text encoder's hidden size.

    Raises ValueError (from UNet2DConditionConfig) for channels the groups do not divide or
    per-level tuples of the wrong length.
    """
    levels = len(block_out_channels)
    cross = [i < levels - 1 for i in range(levels)]
    return UNet2DConditionConfig(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cross[::-1]),
        only_cross_attention=tuple(i == 0 for i in range(levels)),
        block_out_channels=tuple(block_out_channels), layers_per_block=1,
        attention_head_dim=tuple(attention_head_dim), norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim)


def bundled_scheduler() -> DDIMScheduler:
    """The sampler saved with the model: DDIM (Song et al. 2021) on the schedule it was
    trained with, configured as SD v1's DDIM (leading spacing, steps_offset 1,
    set_alpha_to_one False, no clipping)."""
    return DDIMScheduler(**SD_V1_DDIM)


# ---- encoding the training set once ----

def _file_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str],
                   batch_size: int = 256) -> torch.Tensor:
    """Captions → the U-Net's context: `last_hidden_state` of the text encoder on 77 ids
    (padding included, as at sampling time), float32 (B, 77, D) on the encoder's device."""
    device = next(text_encoder.parameters()).device
    out = [text_encoder(tokenizer(captions[i:i + batch_size]).to(device)).last_hidden_state
           for i in range(0, len(captions), batch_size)]
    return torch.cat(out).float()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                   dataset, batch_size: int = 256, seed: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode (picture, caption) items once.

    Returns (latents, context), float16 on the CPU: latents (N, 4, h, w), each sampled from
    the VAE's posterior with a generator seeded by `seed` and scaled (`encode_latents`);
    context (N, 77, D), `encode_prompts` of the captions.
    """
    device = next(vae.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    latents, context = [], []
    for images, captions in tqdm(DataLoader(dataset, batch_size=batch_size), desc="encode",
                                 disable=not progress):
        images = images.to(device=device, dtype=next(vae.parameters()).dtype)
        latents.append(vae.encode_latents(images, generator).half().cpu())
        context.append(encode_prompts(text_encoder, tokenizer, list(captions)).half().cpu())
    return torch.cat(latents), torch.cat(context)


def load_frozen_parts(model: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The VAE, text encoder and tokenizer of a model folder, float32, eval mode, frozen.
    Raises FileNotFoundError naming what is missing (train them first: `vae`, `clip`)."""
    model = Path(model)
    for part in ("vae", "text_encoder", "tokenizer"):
        if not (model / part).is_dir():
            raise FileNotFoundError(f"{model / part} not found; the U-Net trains on the bundled "
                                    "VAE and text encoder: run `python -m minisd.training vae` and "
                                    "`python -m minisd.training clip` first (or `all`)")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    vae, text_encoder = (part.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
                         for part in (vae, text_encoder))
    return vae, text_encoder, CLIPTokenizer.from_pretrained(model / "tokenizer")


def cached_encoding(model: str | Path, num_samples: int, seed: int = 0,
                    cache_dir: str | Path | None = "runs/unet-cache",
                    device: str | torch.device = "cpu", progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (N, 4, h, w), context (N, 77, D), empty-prompt context (77, D)), float16, for
    the first `num_samples` pictures of the train split (seed `seed`), encoded by the parts
    in the folder `model`.

    The file `cache_dir/<key>.safetensors` is reused when the key — a hash of the VAE,
    text encoder and tokenizer files and of (num_samples, seed) — matches; otherwise the set
    is encoded (`encode_dataset`) and written there. `cache_dir=None` never caches.
    """
    model = Path(model)
    files = [model / "vae" / "diffusion_pytorch_model.safetensors",
             model / "text_encoder" / "model.safetensors",
             *sorted((model / "tokenizer").glob("*"))]
    vae, text_encoder, tokenizer = load_frozen_parts(model, device)  # (checks the folder)
    key = hashlib.sha256(f"{_file_digest(files)}/{num_samples}/{seed}/{CACHE_VERSION}"
                         .encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"shapes-{num_samples}-{key}.safetensors"
    if path is not None and path.is_file():
        cached = load_file(path)
        return cached["latents"], cached["context"], cached["empty"]
    dataset = ShapesDataset("train", num_samples, seed=seed)
    latents, context = encode_dataset(vae, text_encoder, tokenizer, dataset, seed=seed,
                                      progress=progress)
    empty = encode_prompts(text_encoder, tokenizer, [""])[0].half().cpu()
    if path is not None:  # written whole, then renamed: a reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({"latents": latents, "context": context, "empty": empty}, partial)
        os.replace(partial, path)
    return latents, context, empty


# ---- the loss ----

def drop_captions(context: torch.Tensor, empty: torch.Tensor, prob: float = UNCOND_PROB
                  ) -> torch.Tensor:
    """Replace each sample's context (B, M, D) by the empty prompt's `empty` (M, D) with
    probability `prob`, independently (torch's global generator). Returns a new tensor;
    `prob` 0 returns `context` itself. Raises ValueError for prob outside [0, 1]."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return context
    drop = torch.rand(context.shape[0], device=context.device) < prob
    return torch.where(drop[:, None, None], empty.to(context), context)


def noise_prediction_loss(schedule: NoiseSchedule, empty: torch.Tensor,
                          uncond_prob: float = UNCOND_PROB):
    """The `loss_fn(unet, batch)` of `minisd.training.loop.train` for ε-prediction.

    batch = (latents z_0 (B, 4, h, w), context (B, M, D)), any float dtype (computed in
    float32). Draws t ~ U{0, …, T−1}, ε ~ N(0, I) and the caption dropout from torch's
    global generator; returns ‖ε − ε_θ(z_t, t, c)‖² averaged over all elements
    (Ho et al. 2020, eq. 14).
    """
    def loss_fn(unet: UNet2DConditionModel, batch) -> torch.Tensor:
        latents, context = (x.float() for x in batch)
        t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],),
                          device=latents.device)
        noise = torch.randn_like(latents)
        noisy = schedule.add_noise(latents, noise, t)
        context = drop_captions(context, empty, uncond_prob)
        return F.mse_loss(unet(noisy, t, context), noise)
    return loss_fn


# ---- the recipe ----

def write_model_index(folder: str | Path, scheduler_class: str = "DDIMScheduler") -> Path:
    """Write `model_index.json` naming diffusers' / transformers' class of each part (as
    diffusers' StableDiffusionPipeline.save_pretrained does). Returns its path."""
    index = {"_class_name": "StableDiffusionPipeline",
             **{part: list(library) for part, library in LIBRARIES.items()},
             "scheduler": ["diffusers", scheduler_class],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    path = Path(folder) / MODEL_INDEX
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def save_loss_curve(losses: list[float], path: str | Path, title: str = "U-Net") -> Path:
    """Write the per-step loss and its moving average (`minisd.viz.draw_loss_curve`) as a
    small PNG. Returns the path."""
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from minisd.viz import draw_loss_curve
    fig = draw_loss_curve(losses, title=title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def train_unet(config: TrainConfig, model: str | Path = BUNDLED_FOLDER,
               output: str | Path | None = BUNDLED_FOLDER,
               block_out_channels: tuple[int, ...] = (24, 48, 48),
               attention_head_dim: tuple[int, ...] = (1, 2, 2), train_samples: int = 20_000,
               cache_dir: str | Path | None = "runs/unet-cache",
               uncond_prob: float = UNCOND_PROB,
               save_dtype: torch.dtype = torch.float16) -> UNet2DConditionModel | None:
    """Train the U-Net on the frozen parts of `model` and write it into `output`.

    Args:
        config: the loop's settings (`DEFAULTS` for the bundled model).
        model: the folder with vae/, text_encoder/ and tokenizer/.
        output: the model folder to write unet/, scheduler/, model_index.json and
            unet_loss.png into (None: write nothing).
        block_out_channels, attention_head_dim: the architecture, `bundled_unet_config`
            with the text encoder's width as cross_attention_dim.
        train_samples: the first this many pictures of the train split are encoded (once,
            cached in `cache_dir`) and trained on.
        uncond_prob: caption dropout for classifier-free guidance.
        save_dtype: dtype of the saved weights.
    Returns:
        on rank 0 the trained U-Net (EMA weights when config.ema_decay is set), float32 on
        the training device (the saved file holds it in `save_dtype`); None on the other ranks of a torchrun run.
    Raises:
        FileNotFoundError when the VAE or text encoder is missing; ValueError as `train`.
    """
    start = time.perf_counter()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    latents, context, empty = cached_encoding(model, train_samples, config.seed, cache_dir,
                                              device, config.progress)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(bundled_unet_config(context.shape[-1], block_out_channels,
                                                    attention_head_dim,
                                                    sample_size=latents.shape[-1]))
    loss_fn = noise_prediction_loss(NoiseSchedule(**SD_V1_SCHEDULE), empty, uncond_prob)
    encoded = time.perf_counter()
    result = train(unet, loss_fn, TensorDataset(latents, context), config)
    if init_distributed().rank != 0:
        return None
    unet = (result.ema_model or result.model).eval()
    if config.progress:
        last = result.history["loss"][-200:]
        print(f"unet: {result.step} steps, {sum(p.numel() for p in unet.parameters()):,} "
              f"parameters; encoding {(encoded - start) / 60:.1f} min, training "
              f"{(time.perf_counter() - encoded) / 60:.1f} min; mean loss of the last "
              f"{len(last)} steps {sum(last) / len(last):.4f}")
    if output is not None:
        output = Path(output)
        copy.deepcopy(unet).to(save_dtype).save_pretrained(output / "unet")
        bundled_scheduler().save_pretrained(output / "scheduler")
        write_model_index(output)
        save_loss_curve(result.history["loss"], output / "unet_loss.png")
        if config.progress:
            print(f"saved {output / 'unet'} ({save_dtype}), scheduler/, {MODEL_INDEX}; "
                  f"evaluate with: python -m minisd.shapes.evaluate --model {output}")
    return unet


DEFAULTS = TrainConfig(steps=3600, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200,
                       schedule="cosine", weight_decay=0.01, grad_clip=1.0, ema_decay=0.999,
                       out_dir="runs/unet", checkpoint_every=500, name="unet")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(BUNDLED_FOLDER),
                        help="model folder with the trained vae/, text_encoder/, tokenizer/")
    parser.add_argument("--output", default=str(BUNDLED_FOLDER),
                        help="model folder to write unet/, scheduler/, model_index.json into "
                             "('none': do not save)")
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=[24, 48, 48],
                        help="U-Net channels per level (16×16, 8×8, 4×4 latents)")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 2],
                        help="attention heads per level (diffusers' attention_head_dim)")
    parser.add_argument("--train-samples", type=int, default=20_000,
                        help="train pictures encoded once and trained on")
    parser.add_argument("--cache-dir", default="runs/unet-cache",
                        help="where the encoded training set is cached ('none': no cache)")
    parser.add_argument("--uncond-prob", type=float, default=UNCOND_PROB,
                        help="share of captions replaced by the empty prompt")
    parser.add_argument("--save-dtype", default="float16", choices=("float16", "float32"))


@register("unet", help="train the bundled U-Net (ε-prediction on the VAE's latents, the frozen "
                       "text encoder's context, 10%% caption dropout) and write unet/, "
                       "scheduler/ and model_index.json into data/minisd-shapes",
          defaults=DEFAULTS, add_arguments=_add_arguments)
def _run(config: TrainConfig, args: argparse.Namespace) -> UNet2DConditionModel | None:
    return train_unet(config, args.model, None if args.output.lower() == "none" else args.output,
                      tuple(args.block_out_channels), tuple(args.heads), args.train_samples,
                      None if args.cache_dir.lower() == "none" else args.cache_dir,
                      args.uncond_prob, getattr(torch, args.save_dtype))


# ---- the whole bundled model ----

STAGES = ("vae", "clip", "unet")
# the TrainConfig fields `all` hands to every stage; the others are each stage's own
SHARED_FIELDS = ("device", "num_workers", "progress", "resume", "seed")


def stage_arguments(stage: str, config: TrainConfig, output: str | Path) -> list[str]:
    """The command line `all` runs `stage` with: its own defaults, the SHARED_FIELDS of
    `config`, and the folder `output` for every part."""
    argv = [stage, "--output", str(Path(output) / "vae") if stage == "vae" else str(output),
            "--seed", str(config.seed), "--num-workers", str(config.num_workers),
            "--progress" if config.progress else "--no-progress"]
    if stage == "unet":
        argv += ["--model", str(output)]
    if config.device is not None:
        argv += ["--device", config.device]
    if config.resume:
        argv.append("--resume")
    return argv


@register("all", help="train the whole bundled model in order — vae, clip, unet, each with its "
                      "own defaults — into one diffusers folder; only --device, --num-workers, "
                      "--progress, --resume and --seed apply to every stage",
          defaults=TrainConfig(name="all"),
          add_arguments=lambda parser: parser.add_argument(
              "--output", default=str(BUNDLED_FOLDER), help="the model folder to write"))
def _run_all(config: TrainConfig, args: argparse.Namespace) -> None:
    from minisd.training import clip, vae  # noqa: F401  (they register clip and vae)

    defaults = TrainConfig(name="all")
    changed = [f.name for f in fields(TrainConfig) if f.name not in SHARED_FIELDS
               and getattr(config, f.name) != getattr(defaults, f.name)]
    if changed:
        options = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ValueError(f"{options}: `all` runs every stage with its own settings; change them "
                         f"per stage (python -m minisd.training vae|clip|unet {options} …)")
    parser = build_parser()
    start = time.perf_counter()
    for stage in STAGES:
        stage_args = parser.parse_args(stage_arguments(stage, config, args.output))
        stage_start = time.perf_counter()
        TARGETS[stage].run(config_from_args(stage_args), stage_args)
        if config.progress and init_distributed().rank == 0:
            print(f"all: {stage} done in {(time.perf_counter() - stage_start) / 60:.1f} min")
    if config.progress and init_distributed().rank == 0:
        print(f"all: the bundled model is in {args.output} "
              f"({(time.perf_counter() - start) / 60:.1f} min)")
