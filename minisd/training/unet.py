"""The recipe of the bundled U-Net: Stable Diffusion's denoiser, trained on the shapes world.

`python -m minisd.training unet` trains the U-Net as latent diffusion does (Rombach et al.
2022, §3.3, eq. 2), on top of the bundled VAE and text encoder, which stay frozen. Every
setting is a field of `UNetTrainConfig` (and a command-line option of the same name):

1. encode the training set once: every picture through the VAE's encoder, a latent sampled
   from q(z | x) and scaled, z_0 = (z − shift_factor)·scaling_factor (B, 4, 16, 16), and
   every caption through the tokenizer and text encoder, whose `last_hidden_state`
   (B, 77, D) is the U-Net's context c. Both are cached in float16 under `cache_dir`,
   keyed by the weights and the data, so a rerun or a resumed run skips this step;
2. every training step (Ho et al. 2020, Algorithm 1): t ~ U{0, …, T−1} and ε ~ N(0, I)
   per sample, z_t = √ᾱ_t·z_0 + √(1 − ᾱ_t)·ε, and a squared error against the target of
   `prediction_type`: the velocity v = √ᾱ_t·ε − √(1 − ᾱ_t)·z_0 (`v_prediction_loss`,
   Salimans & Ho 2022, §4; the default) or the noise ε (`noise_prediction_loss`, eq. 14);
3. the schedule is SD v1's (scaled_linear, β from 0.00085 to 0.012, T = 1000,
   `minisd.schedulers.SD_V1_SCHEDULER_CONFIG`) rescaled to zero terminal SNR
   (`rescale_betas_zero_snr`, Lin et al. 2023, Algorithm 1): ᾱ_T = 0, so the last
   timestep holds no trace of the picture. On SD v1's own schedule √ᾱ at t = 999 is 0.068,
   the picture's mean survives in z_T, the model learns to read the background from the
   noise, and at sampling time reads it from random noise (measured in issue 14: border
   brightness vs the noise's mean, correlation 0.944; vs the prompt's background, 0.005).
   With ᾱ_T = 0, ε-prediction cannot give back z_0 at t = T, hence v-prediction;
4. with probability `uncond_prob` a caption is replaced by the empty prompt's context, so
   the same network also predicts the unconditional output that classifier-free guidance
   needs (Ho & Salimans 2022, §3.2, p_uncond);
5. the shared loop (`minisd.training.loop.train`): AdamW, warm-up + cosine, gradient clipping,
   an EMA of the weights (the EMA is what gets saved), progress bar, resumable checkpoints;
6. write `unet/` (diffusers layout, float16), `scheduler/scheduler_config.json` and
   `model_index.json` into the model folder, and the loss curve as `unet_loss.png`. The
   scheduler is DDIM on the training schedule with `prediction_type`, trailing timestep
   spacing (the first step starts at t = T−1, where zero terminal SNR put pure noise;
   Lin et al. 2023, §3.3), steps_offset 0, set_alpha_to_one false and no clipping;
   `model_index.json` carries `_sampling_defaults` (`guidance_scale`, 25 steps), which the
   pipeline and the command line use.

The network (`unet_config`): three levels of 24, 48, 48 channels at 16×16, 8×8 and 4×4, one
ResNet block per level, self- and cross-attention at the first two levels and in the middle
(`only_cross_attention` False everywhere: issue 14's run A, with self-attention at 16×16,
cost 6% more CPU time than text-only attention there and was part of the fix). On a 2-core
CPU the number of optimisation steps decides quality more than width, so the model is small
and the run long.

Threads or processes, on two cores (`python -m minisd.training all` runs this stage one way or
the other, `AllConfig.unet_launch`). One training step of this U-Net (batch 64), measured with
`benchmarks/bench_training.py` on the 2-core machine while other work shared it (1-minute load
average 6–8), median of 3 alternated runs of 20 steps:

| launch | s/step | CPU-s/step |
|---|---|---|
| 1 process × 1 thread | 1.67 | 0.71 |
| 1 process × 2 OpenMP threads | 17.2 | 6.0 |
| 2 DDP processes × 1 thread (torchrun, gloo, 32 samples each) | 1.16 | 0.78 |

Two OpenMP threads were 10× slower than one: at every parallel region a thread spin-waits
for its partner, which another program has descheduled, and the spinning burns the CPU time
(6.0 CPU-s for a step that needs 0.7). Two processes exchange only the gradients (3.5 MB of
float32, one all-reduce per step) and never wait inside an operation, so contention slows them
no more than one thread. On an idle machine the two launches are about even: a step costs
0.71 CPU-s on one thread and DDP adds about 10%, so two processes need about 0.39 s/step,
which is what two threads took for the previous bundled model on a lightly used machine
(3,600 steps in 23.5 min, model card). Hence `all` launches this stage as two DDP processes
of one thread each: as fast on an idle machine, much faster on a shared one.
"""

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from minisd.checkpoints import LIBRARIES, MODEL_INDEX
from minisd.noise import NoiseSchedule
from minisd.schedulers import SD_V1_SCHEDULER_CONFIG, DDIMScheduler
from minisd.shapes.world import ShapesDataset
from minisd.text_encoder import CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.training.loop import TrainConfig, init_distributed, train
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL

PREDICTION_TYPES = ("v_prediction", "epsilon")
SAVE_DTYPES = ("float16", "float32")
NUM_INFERENCE_STEPS = 25  # the sampling default saved in model_index.json
CACHE_VERSION = 2  # bump when the cached encoding changes meaning


@dataclass
class UNetTrainConfig(TrainConfig):
    """Everything that decides the U-Net's training: the loop's settings (`TrainConfig`,
    with this recipe's defaults) and the recipe's own, each also a command-line option.

    Raises ValueError naming the field for a value out of range, an unknown choice or
    per-level tuples of different lengths.
    """

    # the loop's settings, with this recipe's defaults (their help is TrainConfig's)
    steps: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    ema_decay: float | None = 0.999
    out_dir: str | None = "runs/unet"
    name: str = "unet"
    # the recipe's own
    output: str | None = field(default="runs/minisd-shapes", metadata={
        "help": "model folder to write unet/, scheduler/, model_index.json and unet_loss.png "
                "into ('none': do not save)"})
    model: str | None = field(default=None, metadata={
        "help": "model folder holding the trained vae/, text_encoder/ and tokenizer/ "
                "('none': the --output folder)"})
    block_out_channels: tuple[int, ...] = field(default=(24, 48, 48), metadata={
        "help": "channels per level (16×16, 8×8, 4×4 latents)"})
    attention_head_dim: tuple[int, ...] = field(default=(1, 2, 2), metadata={
        "help": "attention heads per level (diffusers reads attention_head_dim as heads)"})
    only_cross_attention: tuple[bool, ...] = field(default=(False, False, False), metadata={
        "help": "per level: true makes the first attention read the text too (no "
                "self-attention there)"})
    prediction_type: str = field(default="v_prediction", metadata={
        "help": "what the U-Net predicts: v (Salimans & Ho 2022) or the noise ε",
        "choices": PREDICTION_TYPES})
    rescale_betas_zero_snr: bool = field(default=True, metadata={
        "help": "rescale SD v1's schedule to zero terminal SNR (Lin et al. 2023)"})
    guidance_scale: float = field(default=2.5, metadata={
        "help": "classifier-free guidance scale saved as the model's sampling default"})
    two_object_fraction: float = field(default=0.3, metadata={
        "help": "share of two-object scenes in the training pictures"})
    train_samples: int = field(default=20_000, metadata={
        "help": "train pictures encoded once and trained on"})
    cache_dir: str | None = field(default="runs/unet-cache", metadata={
        "help": "where the encoded training set is cached ('none': no cache)"})
    uncond_prob: float = field(default=0.1, metadata={
        "help": "share of captions replaced by the empty prompt (classifier-free guidance)"})
    save_dtype: str = field(default="float16", metadata={
        "help": "dtype of the saved weights", "choices": SAVE_DTYPES})

    def __post_init__(self):
        super().__post_init__()
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_head_dim = tuple(self.attention_head_dim)
        self.only_cross_attention = tuple(self.only_cross_attention)
        levels = len(self.block_out_channels)
        self._need(levels >= 2, "block_out_channels", "at least two levels")
        for name in ("attention_head_dim", "only_cross_attention"):
            self._need(len(getattr(self, name)) == levels, name,
                       f"one value per level ({levels}, as block_out_channels)")
        self._need(self.prediction_type in PREDICTION_TYPES, "prediction_type",
                   f"one of {', '.join(PREDICTION_TYPES)}")
        self._need(self.guidance_scale >= 1, "guidance_scale", "at least 1")
        self._need(0 <= self.two_object_fraction <= 1, "two_object_fraction", "in [0, 1]")
        self._need(0 <= self.uncond_prob <= 1, "uncond_prob", "in [0, 1]")
        self._need(self.train_samples >= 1, "train_samples", "at least 1")
        self._need(self.save_dtype in SAVE_DTYPES, "save_dtype", f"one of {', '.join(SAVE_DTYPES)}")
        self._need(self.output is not None or self.model is not None, "model",
                   "a folder when output is None (there is no VAE to read)")

    def noise_schedule(self) -> dict:
        """The training schedule's config: SD v1's betas, rescaled when
        `rescale_betas_zero_snr`."""
        return {**{key: SD_V1_SCHEDULER_CONFIG[key] for key in
                   ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")},
                "rescale_betas_zero_snr": self.rescale_betas_zero_snr}


def unet_config(config: UNetTrainConfig, cross_attention_dim: int,
                sample_size: int = 16) -> UNet2DConditionConfig:
    """The U-Net that `config` trains (module docstring): latents (B, 4, sample_size,
    sample_size), levels of `block_out_channels` with attention blocks at all but the last
    (`attention_head_dim` heads, `only_cross_attention` per level), one ResNet block per level,
    GroupNorm with 8 groups; `cross_attention_dim` is the text encoder's hidden size.

    Raises ValueError (from UNet2DConditionConfig) for channels the groups do not divide.
    """
    levels = len(config.block_out_channels)
    cross = [i < levels - 1 for i in range(levels)]
    return UNet2DConditionConfig(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cross[::-1]),
        only_cross_attention=config.only_cross_attention,
        block_out_channels=config.block_out_channels, layers_per_block=1,
        attention_head_dim=config.attention_head_dim, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim)


def sampling_scheduler(config: UNetTrainConfig) -> DDIMScheduler:
    """The sampler saved with the model: DDIM (Song et al. 2021) on the training schedule,
    with `prediction_type`, trailing spacing, steps_offset 0, set_alpha_to_one False and no
    clipping (module docstring)."""
    return DDIMScheduler(**config.noise_schedule(), prediction_type=config.prediction_type,
                         timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=False,
                         clip_sample=False)


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
                    two_object_fraction: float = 0.3,
                    cache_dir: str | Path | None = None,
                    device: str | torch.device = "cpu", progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (N, 4, h, w), context (N, 77, D), empty-prompt context (77, D)), float16, for
    the first `num_samples` pictures of the train split (seed `seed`, `two_object_fraction`),
    encoded by the parts in the folder `model`.

    The file `cache_dir/<key>.safetensors` is reused when the key — a hash of the VAE,
    text encoder and tokenizer files and of the data's settings — matches; otherwise the set
    is encoded (`encode_dataset`) and written there. `cache_dir=None` never caches. Under
    torchrun, rank 0 encodes and writes the file while the others wait, then read it.
    """
    world = init_distributed()
    if world.world_size > 1 and cache_dir is not None and world.rank != 0:
        dist.barrier()  # rank 0 writes the cache first
    model = Path(model)
    files = [model / "vae" / "diffusion_pytorch_model.safetensors",
             model / "text_encoder" / "model.safetensors",
             *sorted((model / "tokenizer").glob("*"))]
    vae, text_encoder, tokenizer = load_frozen_parts(model, device)  # (checks the folder)
    settings = f"{num_samples}/{seed}/{two_object_fraction}/{CACHE_VERSION}"
    key = hashlib.sha256(f"{_file_digest(files)}/{settings}".encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"shapes-{num_samples}-{key}.safetensors"
    if path is not None and path.is_file():
        cached = load_file(path)
        encoded = cached["latents"], cached["context"], cached["empty"]
    else:
        dataset = ShapesDataset("train", num_samples, seed, two_object_fraction)
        latents, context = encode_dataset(vae, text_encoder, tokenizer, dataset, seed=seed,
                                          progress=progress)
        empty = encode_prompts(text_encoder, tokenizer, [""])[0].half().cpu()
        encoded = latents, context, empty
        if path is not None:  # written whole, then renamed: a reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            save_file({"latents": latents, "context": context, "empty": empty}, partial)
            os.replace(partial, path)
    if world.world_size > 1 and cache_dir is not None and world.rank == 0:
        dist.barrier()
    return encoded


# ---- the loss: one small function per prediction type ----

def drop_captions(context: torch.Tensor, empty: torch.Tensor, prob: float) -> torch.Tensor:
    """Replace each sample's context (B, M, D) by the empty prompt's `empty` (M, D) with
    probability `prob`, independently (torch's global generator). Returns a new tensor;
    `prob` 0 returns `context` itself. Raises ValueError for prob outside [0, 1]."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return context
    drop = torch.rand(context.shape[0], device=context.device) < prob
    return torch.where(drop[:, None, None], empty.to(context), context)


def noised_batch(schedule: NoiseSchedule, batch, empty: torch.Tensor, uncond_prob: float):
    """One training step's draw (Ho et al. 2020, Algorithm 1), from torch's global generator in
    this order: t ~ U{0, …, T−1} (B,), ε ~ N(0, I) like z_0, the caption dropout.

    batch = (latents z_0 (B, 4, h, w), context (B, M, D)), any float dtype (computed in
    float32). Returns (z_0, ε, t, z_t = √ᾱ_t·z_0 + √(1 − ᾱ_t)·ε, context with dropout)."""
    latents, context = (x.float() for x in batch)
    t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],),
                      device=latents.device)
    noise = torch.randn_like(latents)
    noisy = schedule.add_noise(latents, noise, t)
    return latents, noise, t, noisy, drop_captions(context, empty, uncond_prob)


def noise_prediction_loss(schedule: NoiseSchedule, empty: torch.Tensor, uncond_prob: float = 0.1):
    """The `loss_fn(unet, batch)` of `minisd.training.loop.train` for ε-prediction:
    ‖ε − ε_θ(z_t, t, c)‖² averaged over all elements (Ho et al. 2020, eq. 14); the draw is
    `noised_batch`'s."""
    def loss_fn(unet: UNet2DConditionModel, batch) -> torch.Tensor:
        _, noise, t, noisy, context = noised_batch(schedule, batch, empty, uncond_prob)
        return F.mse_loss(unet(noisy, t, context), noise)
    return loss_fn


def v_prediction_loss(schedule: NoiseSchedule, empty: torch.Tensor, uncond_prob: float = 0.1):
    """The `loss_fn(unet, batch)` of `minisd.training.loop.train` for v-prediction:
    ‖v − v_θ(z_t, t, c)‖² with v = √ᾱ_t·ε − √(1 − ᾱ_t)·z_0, averaged over all elements
    (Salimans & Ho 2022, §4); the draw is `noised_batch`'s. At ᾱ_t = 0 (zero terminal SNR)
    z_t = ε holds no picture: the ε target would be z_t itself, v = −z_0 asks for the picture."""
    def loss_fn(unet: UNet2DConditionModel, batch) -> torch.Tensor:
        latents, noise, t, noisy, context = noised_batch(schedule, batch, empty, uncond_prob)
        alpha_bar = schedule.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
        v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        return F.mse_loss(unet(noisy, t, context), v)
    return loss_fn


LOSSES = {"epsilon": noise_prediction_loss, "v_prediction": v_prediction_loss}


# ---- the recipe ----

def write_model_index(folder: str | Path, scheduler: DDIMScheduler,
                      guidance_scale: float) -> Path:
    """Write `model_index.json`: diffusers' / transformers' class of each part (as diffusers'
    StableDiffusionPipeline.save_pretrained does) and `_sampling_defaults` (guidance_scale,
    num_inference_steps), which minisd's pipeline reads and diffusers ignores (a key that
    starts with "_"). Returns its path."""
    index = {"_class_name": "StableDiffusionPipeline",
             "_sampling_defaults": {"guidance_scale": guidance_scale,
                                    "num_inference_steps": NUM_INFERENCE_STEPS},
             **{part: list(library) for part, library in LIBRARIES.items()},
             "scheduler": ["diffusers", type(scheduler).__name__],
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


@dataclass
class UNetTrainResult:
    """What `train_unet` returns on rank 0: the trained U-Net (the EMA weights when
    `ema_decay` is set; float32, eval mode, on the training device; the saved file holds it
    in `save_dtype`), the loop's per-step history, and the minutes spent encoding and
    training."""

    unet: UNet2DConditionModel
    history: dict[str, list[float]]
    encode_minutes: float
    train_minutes: float


def train_unet(config: UNetTrainConfig) -> UNetTrainResult | None:
    """Train the U-Net on the frozen parts of `config.model` (default `config.output`) and
    write unet/, scheduler/, model_index.json and unet_loss.png into `config.output` (module
    docstring). Writes nothing to stdout (`run` prints).

    Returns a UNetTrainResult on rank 0; None on the other ranks of a torchrun run.
    Raises FileNotFoundError when the VAE or text encoder is missing; ValueError as `train`.
    """
    start = time.perf_counter()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    latents, context, empty = cached_encoding(
        config.model or config.output, config.train_samples, config.seed,
        config.two_object_fraction, config.cache_dir, device, config.progress)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(unet_config(config, context.shape[-1], latents.shape[-1]))
    loss_fn = LOSSES[config.prediction_type](NoiseSchedule(**config.noise_schedule()),
                                             empty, config.uncond_prob)
    encoded = time.perf_counter()
    result = train(unet, loss_fn, TensorDataset(latents, context), config)
    if init_distributed().rank != 0:
        return None
    unet = (result.ema_model or result.model).eval()
    if config.output is not None:
        output = Path(config.output)
        copy.deepcopy(unet).to(getattr(torch, config.save_dtype)).save_pretrained(output / "unet")
        scheduler = sampling_scheduler(config)
        scheduler.save_pretrained(output / "scheduler")
        write_model_index(output, scheduler, config.guidance_scale)
        save_loss_curve(result.history["loss"], output / "unet_loss.png")
    return UNetTrainResult(unet, result.history, (encoded - start) / 60,
                           (time.perf_counter() - encoded) / 60)


def run(config: UNetTrainConfig) -> UNetTrainResult | None:
    """`python -m minisd.training unet`: `train_unet`, then (rank 0) print a summary."""
    result = train_unet(config)
    if result is not None:
        last = result.history["loss"][-200:]
        print(f"unet: {len(result.history['loss'])} steps, "
              f"{sum(p.numel() for p in result.unet.parameters()):,} parameters; encoding "
              f"{result.encode_minutes:.1f} min, training {result.train_minutes:.1f} min; mean "
              f"loss of the last {len(last)} steps {sum(last) / max(1, len(last)):.4f}")
        if config.output is not None:
            print(f"saved {Path(config.output) / 'unet'} ({config.save_dtype}), scheduler/, "
                  f"{MODEL_INDEX}; evaluate with: python -m minisd.shapes.evaluate "
                  f"--model {config.output}")
    return result
