"""Chapter 6: the whole pipeline, a prompt in and a picture out.

Stable Diffusion (Rombach et al. 2022, §3.3 and §4.3) assembled from the five parts of the
earlier chapters:

    prompt ──tokenizer──▶ ids (B, 77) ──text encoder──▶ context c (B, 77, D)
    noise z_T ~ N(0, I)·init_noise_sigma                       (B, 4, H/8, W/8)
    for t in the scheduler's grid:
        ε_u, ε_c = U-Net([z_t, z_t], t, [c_negative, c])       one batched call
        ε̂ = ε_u + s·(ε_c − ε_u)                                classifier-free guidance
        z_t ← scheduler.step(ε̂, t, z_t)                        (also gives the predicted x̂_0)
    picture = VAE decoder(z_0 / scaling_factor)                 (B, 3, H, W) in [−1, 1]

Img2img (SDEdit, Meng et al. 2022) starts instead from a picture's latents noised to an
intermediate step: `strength` ∈ [0, 1] is the fraction of the grid that is run (0 returns
the picture's latents untouched, 1 ignores the picture).

`StableDiffusionPipeline` follows the names and conventions of diffusers' pipeline of the same
name (tested to match it on the same weights). `denoising_steps` yields every step's state for
notebooks and widgets; `decode` turns latents into pictures. Weights load through
minisd/checkpoints.py: a diffusers model folder, an original SD v1 single file, or, by
default, the model trained for this course in data/minisd-shapes/.
"""

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from minisd import checkpoints
from minisd.guidance import classifier_free_guidance, needs_unconditional_pass
from minisd.package_data import bundled_model
from minisd.schedulers import Scheduler, from_name, randn_tensor
from minisd.text_encoder import CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL

OUTPUT_TYPES = ("pil", "pt", "latent")
# what a hub download fetches: configs, tokenizer files and safetensors weights only
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*.non_ema.*", "*.ema.*", "safety_checker/*", "feature_extractor/*"]


def default_device() -> torch.device:
    """The best device available: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (half the memory, tensor cores; the VAE decode is guarded),
    float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class StepState:
    """One denoising step, as `denoising_steps` yields it.

    step: 0-based index of the step run; num_steps: how many there are in all.
    timestep: t of the step (a 0-d tensor; fractional for Euler's linspace grid).
    latents: the sample after the step, (B, 4, H/8, W/8).
    pred_original_sample: x̂_0 predicted at this step, (B, 4, H/8, W/8); decode it to see
        what the model believes the picture is.
    """

    step: int
    num_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass
class PipelineOutput:
    """`images`: a list of B PIL images ('pil'), a float32 tensor (B, 3, H, W) in [0, 1]
    ('pt') or the final latents (B, 4, H/8, W/8) ('latent')."""

    images: list[Image.Image] | torch.Tensor


class StableDiffusionPipeline:
    """Text-to-image (and image-to-image) with a latent diffusion model.

    Args (the five parts, diffusers' names):
        vae: AutoencoderKL; text_encoder: CLIPTextModel; tokenizer: CLIPTokenizer;
        unet: UNet2DConditionModel; scheduler: any minisd scheduler.
    The networks must be on one device, in one dtype (`to` moves them).

    Build with `from_pretrained` (a model folder, a Hub id, or the bundled model by default)
    or `from_single_file`; generate with `pipe(prompt)`.
    """

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, unet: UNet2DConditionModel, scheduler: Scheduler):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None,
                        torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        trust_pickle: bool = False) -> "StableDiffusionPipeline":
        """Load a diffusers-format model folder.

        Args:
            pretrained_model_name_or_path: a folder; a Hugging Face Hub id such as
                "stable-diffusion-v1-5/stable-diffusion-v1-5" (downloaded with
                huggingface_hub when it is installed and online, else taken from its cache);
                None for the bundled model in data/minisd-shapes.
            torch_dtype: None for float16 on CUDA and float32 elsewhere.
            device: None for CUDA, then MPS, then the CPU.
            trust_pickle: allow `.bin` weights that hold Python objects (see checkpoints).
        Raises:
            FileNotFoundError when the model cannot be found (saying how to get it: train the
            bundled model, install huggingface_hub, or download the folder), or a part is
            missing; ValueError from `checkpoints.load_pretrained` for weights that do not fit.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = torch_dtype or default_dtype(device)
        folder = _model_folder(pretrained_model_name_or_path)
        return cls(**checkpoints.load_pretrained(folder, dtype, device, trust_pickle))

    @classmethod
    def from_single_file(cls, path: str | Path, config: str | Path | None = None,
                         use_ema: bool | None = None, torch_dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None,
                         trust_pickle: bool = False) -> "StableDiffusionPipeline":
        """Load an original SD v1 checkpoint (`.safetensors` or `.ckpt`); `config` (a model
        folder for other shapes), `use_ema` and `trust_pickle` as in
        `checkpoints.load_single_file`; `torch_dtype` and `device` as in `from_pretrained`.
        Raises FileNotFoundError for a missing file, ValueError for a foreign or broken one."""
        device = torch.device(device) if device is not None else default_device()
        dtype = torch_dtype or default_dtype(device)
        return cls(**checkpoints.load_single_file(path, config, use_ema, dtype, device,
                                                  trust_pickle))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-format model folder (readable by diffusers too)."""
        return checkpoints.save_pretrained(folder, **self.components)

    @property
    def components(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "unet": self.unet, "scheduler": self.scheduler}

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> "StableDiffusionPipeline":
        """Move the three networks to `device` and/or `dtype`; returns self."""
        for model in (self.vae, self.text_encoder, self.unet):
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """How much smaller the latents are than the picture: 8 for SD v1."""
        return self.vae.downsampling_factor

    # ---- the parts of a run ----

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str],
                      num_images_per_prompt: int = 1, guidance_scale: float = 7.5
                      ) -> torch.Tensor:
        """Text → the U-Net's context, batched as [negative…, positive…].

        Each prompt is tokenised to 77 ids (longer ones are cut with a warning naming the
        dropped words) and encoded; each row is repeated `num_images_per_prompt`
        times. The negative half is left out when guidance needs no unconditional pass
        (s = 1).
        Returns (2B, 77, D), or (B, 77, D) without the negative half; B = prompts × images.
        """
        def encode(texts):
            ids = self.tokenizer(texts).to(self.device)
            hidden = self.text_encoder(ids).last_hidden_state
            return hidden.repeat_interleave(num_images_per_prompt, dim=0)

        context = encode(prompts)
        if not needs_unconditional_pass(guidance_scale):
            return context
        return torch.cat([encode(negative_prompts), context])

    def _image_latents(self, image, batch: int, generator) -> torch.Tensor:
        """Encode img2img's picture(s) into scaled latents (batch, 4, h, w), sampling the
        VAE's posterior with `generator` (as diffusers does)."""
        x = _image_tensor(image).to(device=self.device, dtype=_dtype(self.vae))
        f = self.vae_scale_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"the image is {x.shape[-2]}×{x.shape[-1]}; height and width must "
                             f"be multiples of {f} (resize it, e.g. "
                             "minisd.images.load_image(path, size=(h, w)))")
        if batch % x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images for {batch} pictures; pass one image, "
                             "or one per prompt")
        if isinstance(generator, list):
            latents = torch.cat([self.vae.encode_latents(x[i % len(x)][None], g)
                                 for i, g in enumerate(generator[:len(x)])])
        else:
            latents = self.vae.encode_latents(x, generator)
        return latents.repeat_interleave(batch // len(x), dim=0).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents → pictures.

        Args:
            latents: scaled latents (B, 4, h, w), as the denoising loop leaves them.
            output_type: 'pil' (a list of B PIL images), 'pt' (float32 (B, 3, 8h, 8w) in
                [0, 1], on the pipeline's device) or 'latent' (the latents, unchanged).
        Half-precision safety: when a decode in float16/bfloat16 gives NaN or inf,
        it is redone in float32 (on a float32 copy of the VAE) with a warning; pictures are
        never made of NaN turned to 0.
        Raises:
            ValueError for an unknown output_type, or when the latents themselves, or the
            float32 decode, are not finite (run in float32 then).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        if output_type == "latent":
            return latents
        if not torch.isfinite(latents).all():
            raise ValueError(f"the latents hold NaN or inf: the denoising overflowed in "
                             f"{self.dtype}; generate in float32 (torch_dtype=torch.float32, "
                             "command line --dtype float32)")
        vae_dtype = _dtype(self.vae)
        images = self.vae.decode_latents(latents.to(vae_dtype))
        if not torch.isfinite(images).all() and vae_dtype != torch.float32:
            warnings.warn(f"the VAE decode overflowed in {vae_dtype} (NaN or inf); decoded "
                          "again in float32", stacklevel=2)
            images = copy.deepcopy(self.vae).float().decode_latents(latents.float())
        if not torch.isfinite(images).all():
            raise ValueError("the VAE decode gave NaN or inf even in float32: the latents are "
                             "far outside what the VAE was trained on")
        images = (images.float() / 2 + 0.5).clamp(0, 1)           # [−1, 1] → [0, 1]
        if output_type == "pt":
            return images
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]

    @torch.inference_mode()
    def denoising_steps(self, prompt: str | list[str], negative_prompt=None,
                        height: int | None = None, width: int | None = None,
                        num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        num_images_per_prompt: int = 1, generator=None, seed: int | None = None,
                        scheduler: str | Scheduler | None = None, image=None,
                        strength: float = 0.8, latents: torch.Tensor | None = None,
                        progress: bool = True) -> Iterator[StepState]:
        """The denoising loop as a generator: yields a `StepState` after every step.

        Arguments as in `__call__`. The final state's `latents` go to `decode`. With an
        `image` and strength 0 no step runs and nothing is yielded.
        """
        run = self._prepare(prompt, negative_prompt, height, width, num_inference_steps,
                            guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                            image, strength, latents)
        yield from self._denoise(run, progress)

    def _denoise(self, run: "_Run", progress: bool) -> Iterator[StepState]:
        """The loop itself: one (batched) U-Net call, guidance and a scheduler step per t."""
        x, sched, n = run.latents, run.scheduler, len(run.timesteps)
        guided = needs_unconditional_pass(run.guidance_scale)
        for i, t in enumerate(tqdm(run.timesteps, disable=not progress, desc="denoising")):
            model_input = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            noise_pred = self.unet(model_input, t, run.context)
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = classifier_free_guidance(noise_uncond, noise_text,
                                                      run.guidance_scale)
            out = sched.step(noise_pred, t, x, generator=run.generator)
            x = out.prev_sample
            yield StepState(i, n, t, x, out.pred_original_sample)

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, generator=None, seed: int | None = None,
                 scheduler: str | Scheduler | None = None, output_type: str = "pil",
                 progress: bool = True, callback: Callable[[StepState], None] | None = None,
                 image=None, strength: float = 0.8,
                 latents: torch.Tensor | None = None) -> PipelineOutput:
        """Generate pictures from prompts.

        Args:
            prompt: a string or a non-empty list of P strings.
            negative_prompt: None (""), a string for every prompt, or a list of P strings:
                what guidance steers away from.
            height, width: picture size in pixels, multiples of the VAE factor (8); default
                the U-Net's sample_size × 8 (512 for SD v1). Ignored with `image`.
            num_inference_steps: grid length n ≥ 1.
            guidance_scale: s of classifier-free guidance (Ho & Salimans 2022, SD's
                convention); s = 1 runs one U-Net call per step without the negative half,
                any other s one batched call on [negative, positive].
            num_images_per_prompt: pictures per prompt; B = P × this.
            generator: a torch.Generator, or a list of B (one per picture); noise is drawn on
                its device then moved, so a seed gives the same picture on every device.
            seed: shortcut for generator=torch.Generator("cpu").manual_seed(seed).
            scheduler: None (the pipeline's), a name ("ddim", "euler", "euler_ancestral",
                "dpmpp_2m", "ddpm") built on the pipeline's scheduler config, or a Scheduler.
            output_type: 'pil', 'pt' or 'latent' (see `decode`).
            progress: show a tqdm progress bar; False writes nothing.
            callback: called with each StepState.
            image: img2img's starting picture: a PIL image, a list of them, or a tensor
                (3, H, W) or (1 or P, 3, H, W) with values in [−1, 1] (as
                minisd.images.load_image returns); H, W multiples of 8.
            strength: with `image`, the fraction of the n steps that is run, in [0, 1].
            latents: the starting noise ε (B, 4, H/8, W/8) instead of drawing it; it is
                multiplied by the scheduler's init_noise_sigma (as diffusers does). With
                `image`, the noise added to the picture's latents.
        Returns:
            PipelineOutput(images).
        Raises:
            ValueError naming the problem: an empty prompt list, prompt and negative-prompt
            lists of different lengths, height/width not multiples of 8, steps < 1, strength
            outside [0, 1], a bad output_type, both seed and generator, latents of the wrong
            shape; and the errors of `decode`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        run = self._prepare(prompt, negative_prompt, height, width, num_inference_steps,
                            guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                            image, strength, latents)
        final = run.latents     # stays the picture's latents for img2img at strength 0
        for state in self._denoise(run, progress):
            final = state.latents
            if callback is not None:
                callback(state)
        return PipelineOutput(self.decode(final, output_type))

    # ---- checks and set-up ----

    def _prepare(self, prompt, negative_prompt, height, width, num_inference_steps,
                 guidance_scale, num_images_per_prompt, generator, seed, scheduler, image,
                 strength, latents) -> "_Run":
        """Validate the arguments, encode the text, make the grid and the starting latents."""
        prompts = _prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number ≥ 1, got "
                             f"{num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (e.g. 7.5), got "
                             f"{guidance_scale!r}")
        if image is not None and not 0 <= strength <= 1:
            raise ValueError(f"strength must lie in [0, 1] (the fraction of the steps run on "
                             f"the image), got {strength}")
        generator = _generator(generator, seed)
        sched = self._scheduler(scheduler)
        batch = len(prompts) * num_images_per_prompt

        sched.set_timesteps(num_inference_steps, device=self.device)
        timesteps = sched.timesteps
        if image is None:
            shape = self._latent_shape(batch, height, width)
            noise = self._noise(shape, latents, generator)
            x = noise * sched.init_noise_sigma
        else:
            init = self._image_latents(image, batch, generator)
            start = num_inference_steps - min(int(num_inference_steps * strength),
                                              num_inference_steps)
            timesteps = timesteps[start:]
            x = init
            if len(timesteps):
                noise = self._noise(init.shape, latents, generator)
                x = sched.add_noise(init, noise, timesteps[:1].repeat(batch))
        context = self.encode_prompt(prompts, negatives, num_images_per_prompt, guidance_scale)
        return _Run(sched, timesteps, x.to(self.dtype), context.to(self.dtype), guidance_scale,
                    generator)

    def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple:
        f = self.vae_scale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < f:
                raise ValueError(f"{name} must be a whole number of pixels, at least {f} and a "
                                 f"multiple of {f} (the VAE's downsampling factor), got {value!r}")
        if height % f or width % f:
            def near(n):
                below, above = n // f * f, (n // f + 1) * f
                return str(n) if n % f == 0 else (f"{below} or {above}" if below else str(above))
            raise ValueError(f"height and width must be multiples of {f} (the VAE's "
                             f"downsampling factor), got {height}×{width}; height {near(height)}"
                             f", width {near(width)} would work")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def _noise(self, shape: tuple, latents: torch.Tensor | None, generator) -> torch.Tensor:
        if latents is None:
            return randn_tensor(shape, generator, self.device, self.dtype)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)} (pictures, channels, "
                             f"height/{self.vae_scale_factor}, width/{self.vae_scale_factor}), "
                             f"got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=self.dtype)

    def _scheduler(self, scheduler: str | Scheduler | None) -> Scheduler:
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            # SD's latents are not clipped to [−1, 1] (clip_sample=False in SD's configs); a
            # config without the key (e.g. DPM-Solver's) would otherwise give DDIM's True.
            return from_name(scheduler, {"clip_sample": False,
                                         **asdict(self.scheduler.config)})
        return scheduler


# ---- helpers ----

class _Run(NamedTuple):
    """Everything one run's loop needs, made by `_prepare`."""

    scheduler: Scheduler
    timesteps: torch.Tensor
    latents: torch.Tensor
    context: torch.Tensor
    guidance_scale: float
    generator: object


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _prompt_list(prompt) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got "
                        f"{type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("the prompt list is empty; pass a string or a list of strings")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {', '.join(bad)}")
    return prompts


def _negative_list(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negatives = _prompt_list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"{n} prompt(s) but {len(negatives)} negative prompt(s); pass one "
                         "negative prompt per prompt, or a single string for all")
    return negatives


def _generator(generator, seed: int | None):
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
                or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
        return torch.Generator("cpu").manual_seed(seed)
    return generator


def _image_tensor(image) -> torch.Tensor:
    """A PIL image, a list of them, or a tensor in [−1, 1] → float32 (N, 3, H, W) in [−1, 1]."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in image]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("img2img images must all have the same size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, a list of them or a tensor, "
                        f"got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"an image tensor must have shape (3, H, W) or (N, 3, H, W), "
                         f"got {tuple(image.shape)}")
    low, high = x.min().item(), x.max().item()
    if low < -1.001 or high > 1.001:
        raise ValueError(f"image tensors take values in [-1, 1] (minisd.images.load_image's), "
                         f"got {low:g} … {high:g}")
    return x.float()


def _model_folder(name: str | Path | None) -> Path:
    """Where a model folder is: the bundled one, a local folder, or a Hub download."""
    if name is None:
        return bundled_model()
    path = Path(name)
    if path.is_dir():
        return path
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file; load single-file checkpoints with "
                                "StableDiffusionPipeline.from_single_file")
    name = str(name)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"no model folder at {name} (and it is not a Hub id like "
                                "'org/model')")
    return _hub_download(name)


def _hub_download(repo_id: str) -> Path:
    how = (f"Download the folder where you are online (`hf download {repo_id}` or "
           f"huggingface_hub.snapshot_download) and pass its path")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id} is not a folder here, and huggingface_hub is not "
                                f"installed to fetch it from the Hub (pip install "
                                f"'minisd[hub]'). {how}.") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=HUB_IGNORE))
    except (OSError, ValueError) as error:  # offline, unknown repo, no network, bad id
        raise FileNotFoundError(f"no folder {repo_id} here, and it could not be fetched from "
                                f"the Hugging Face Hub "
                                f"({type(error).__name__}: {error}). {how}; with "
                                "HF_HUB_OFFLINE=1 only the local cache is read.") from error
