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

Img2img (SDEdit, Meng et al. 2022) starts instead from a picture's latents x_0, noised with
q(x_t | x_0) (Ho et al. 2020, eq. 4) at the first timestep it then denoises: with strength
s ∈ [0, 1], the last int(n·s) steps of the n-step grid run (none: the picture comes back
through the VAE; all: the picture is drowned in noise).

`StableDiffusionPipeline` follows the names and conventions of diffusers' pipeline of the same
name (tested to match it on the same weights). A call checks its arguments first
(`check_inputs`), fills in the model's own step count and guidance scale where none is given
(`sampling_defaults`), and runs on its own copy of the scheduler. `denoising_steps` yields
every step's state for notebooks and widgets; `decode` turns latents into pictures. Weights
load through minisd/checkpoints.py: a diffusers model folder, an original SD v1 single file,
or, by default, the model trained for this course in data/minisd-shapes/.
"""

import copy
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from minisd import checkpoints
from minisd.guidance import classifier_free_guidance, needs_unconditional_pass
from minisd.images import image_to_tensor
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
DEFAULT_STRENGTH = 0.8     # img2img's strength when none is given (diffusers')
# the key of model_index.json holding the model's sampling defaults (see SamplingDefaults)
SAMPLING_DEFAULTS_KEY = "_sampling_defaults"


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


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a model was made for, used when a call leaves them out.

    A model folder keeps them in `model_index.json` as
    `"_sampling_defaults": {"guidance_scale": 4.0, "num_inference_steps": 25}` (the
    underscore makes diffusers' loader skip the key); a model without them gets diffusers'
    defaults, 7.5 and 50. Raises ValueError for a guidance scale that is not a finite number
    or a step count that is not a whole number ≥ 1.
    """

    guidance_scale: float = 7.5
    num_inference_steps: int = 50

    def __post_init__(self):
        if not _finite_number(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got "
                             f"{self.guidance_scale!r}")
        if not _whole_number(self.num_inference_steps, 1):
            raise ValueError(f"num_inference_steps must be a whole number ≥ 1, got "
                             f"{self.num_inference_steps!r}")

    @classmethod
    def from_model_index(cls, path: Path) -> "SamplingDefaults":
        """Read them from a `model_index.json` (diffusers' defaults where it has none).
        Raises ValueError naming the file and the key for a value that does not fit."""
        index = json.loads(path.read_text())
        values = index.get(SAMPLING_DEFAULTS_KEY, {})
        names = [f.name for f in fields(cls)]
        if not isinstance(values, dict) or set(values) - set(names):
            raise ValueError(f"{path}: {SAMPLING_DEFAULTS_KEY} must be an object with the keys "
                             f"{' and '.join(names)}, got {values!r}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{path}: {SAMPLING_DEFAULTS_KEY}: {error}") from None

    def write_to_model_index(self, path: Path) -> None:
        """Add them to the `model_index.json` at `path`."""
        index = json.loads(path.read_text())
        index[SAMPLING_DEFAULTS_KEY] = asdict(self)
        path.write_text(json.dumps(index, indent=2) + "\n")


class StableDiffusionPipeline:
    """Text-to-image (and image-to-image) with a latent diffusion model.

    Args (the five parts, diffusers' names):
        vae: AutoencoderKL; text_encoder: CLIPTextModel; tokenizer: CLIPTokenizer;
        unet: UNet2DConditionModel; scheduler: any minisd scheduler.
        sampling_defaults: the guidance scale and step count a call uses when it gives none
            (`SamplingDefaults`; None for diffusers' 7.5 and 50).
    The networks must be on one device, in one dtype (`to` moves them).

    Build with `from_pretrained` (a model folder, a Hub id, or the bundled model by default)
    or `from_single_file`; generate with `pipe(prompt)`. Every call works on its own copy of
    the scheduler, so calls and `denoising_steps` generators can be interleaved.
    """

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, unet: UNet2DConditionModel, scheduler: Scheduler,
                 sampling_defaults: SamplingDefaults | None = None):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler
        self.sampling_defaults = sampling_defaults or SamplingDefaults()

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        trust_pickle: bool = False) -> "StableDiffusionPipeline":
        """Load a diffusers-format model folder, with its sampling defaults.

        Args:
            pretrained_model_name_or_path: a folder; a Hugging Face Hub id such as
                "stable-diffusion-v1-5/stable-diffusion-v1-5" (downloaded with
                huggingface_hub when it is installed and online, else taken from its cache);
                None for the bundled model (`minisd.package_data.bundled_model()`).
            subfolder: the model folder inside that one (or inside the Hub repository).
            torch_dtype: None for float16 on CUDA and float32 elsewhere.
            device: None for CUDA, then MPS, then the CPU.
            trust_pickle: allow `.bin` weights that hold Python objects (see checkpoints).
        Raises:
            FileNotFoundError when the model cannot be found (saying how to get it: train the
            bundled model, install huggingface_hub, or download the folder), or a part is
            missing; ValueError from `checkpoints.load_pretrained` for weights that do not fit,
            or for sampling defaults in model_index.json that do not fit.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = torch_dtype or default_dtype(device)
        folder = _model_folder(pretrained_model_name_or_path)
        if subfolder:
            folder = folder / subfolder
        parts = checkpoints.load_pretrained(folder, dtype, device, trust_pickle)
        return cls(**parts, sampling_defaults=SamplingDefaults.from_model_index(
            folder / checkpoints.MODEL_INDEX))

    @classmethod
    def from_single_file(cls, path: str | Path, config: str | Path | None = None,
                         use_ema: bool | None = None, torch_dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None,
                         trust_pickle: bool = False) -> "StableDiffusionPipeline":
        """Load an original SD v1 checkpoint (`.safetensors` or `.ckpt`); `config` (a model
        folder for other shapes, whose sampling defaults are used too), `use_ema` and
        `trust_pickle` as in `checkpoints.load_single_file`; `torch_dtype` and `device` as in
        `from_pretrained`.
        Raises FileNotFoundError for a missing file, ValueError for a foreign or broken one."""
        device = torch.device(device) if device is not None else default_device()
        dtype = torch_dtype or default_dtype(device)
        parts = checkpoints.load_single_file(path, config, use_ema, dtype, device, trust_pickle)
        index = Path(config) / checkpoints.MODEL_INDEX if config is not None else None
        defaults = SamplingDefaults.from_model_index(index) if index and index.is_file() else None
        return cls(**parts, sampling_defaults=defaults)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-format model folder (readable by diffusers too), with the sampling
        defaults in its model_index.json; returns the folder."""
        folder = checkpoints.save_pretrained(folder, **self.components)
        self.sampling_defaults.write_to_model_index(folder / checkpoints.MODEL_INDEX)
        return folder

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
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True
                      ) -> torch.Tensor:
        """Text → the U-Net's context, batched as [negative…, positive…].

        Each prompt is tokenised to 77 ids (longer ones are cut with a warning naming the
        dropped words) and encoded; each row is repeated `num_images_per_prompt`
        times. The negative half is left out without classifier-free guidance (s = 1).
        Returns (2B, 77, D), or (B, 77, D) without the negative half; B = prompts × images.
        """
        def encode(texts):
            ids = self.tokenizer(texts).to(self.device)
            hidden = self.text_encoder(ids).last_hidden_state
            return hidden.repeat_interleave(num_images_per_prompt, dim=0)

        context = encode(prompts)
        if not do_classifier_free_guidance:
            return context
        return torch.cat([encode(negative_prompts), context])

    def _image_latents(self, images: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """img2img's pictures (N, 3, H, W) in [−1, 1] → scaled latents (batch, 4, h, w):
        picture j starts from image j // (batch / N). The VAE's posterior is sampled with
        `generator`: with one generator per picture, picture j's sample comes from
        generator j (one encode per picture); with one generator, each image is encoded once
        and its sample shared by its pictures (as diffusers does)."""
        x = images.to(device=self.device, dtype=_dtype(self.vae))
        per_image = batch // len(x)
        if isinstance(generator, list):
            x = x.repeat_interleave(per_image, dim=0)
            latents = torch.cat([self.vae.encode_latents(x[j:j + 1], g)
                                 for j, g in enumerate(generator)])
        else:
            latents = self.vae.encode_latents(x, generator).repeat_interleave(per_image, dim=0)
        return latents.to(self.dtype)

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
                        num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, num_images_per_prompt: int = 1,
                        generator=None, seed: int | None = None,
                        scheduler: str | Scheduler | None = None, image=None,
                        strength: float | None = None, latents: torch.Tensor | None = None,
                        progress: bool = True) -> Iterator[StepState]:
        """The denoising loop as a generator: yields a `StepState` after every step.

        Arguments as in `__call__`; each generator runs on its own copy of the scheduler. The
        final state's `latents` go to `decode`. With an `image` and int(n·strength) = 0 no
        step runs and nothing is yielded.
        """
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                          guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                          image, strength, latents)
        run = self._prepare(prompt, negative_prompt, height, width, num_inference_steps,
                            guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                            image, strength, latents)
        yield from self._denoise(run, progress)

    def _denoise(self, run: "_Run", progress: bool) -> Iterator[StepState]:
        """The loop (Rombach et al. 2022, with Ho & Salimans 2022's guidance): for each t,
        ε̂ = ε_u + s·(ε_c − ε_u) from one batched U-Net call, then z ← scheduler.step(ε̂, t, z)."""
        z, scheduler, s = run.latents, run.scheduler, run.guidance_scale
        guided = needs_unconditional_pass(s)
        for i, t in enumerate(tqdm(run.timesteps, disable=not progress, desc="denoising")):
            z_in = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
            eps = self.unet(z_in, t, run.context)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = classifier_free_guidance(eps_uncond, eps_text, s)
            out = scheduler.step(eps, t, z, generator=run.generator)
            z = out.prev_sample
            yield StepState(i, len(run.timesteps), t, z, out.pred_original_sample)

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, generator=None, seed: int | None = None,
                 scheduler: str | Scheduler | None = None, output_type: str = "pil",
                 progress: bool = True, callback: Callable[[StepState], None] | None = None,
                 image=None, strength: float | None = None,
                 latents: torch.Tensor | None = None) -> PipelineOutput:
        """Generate pictures from prompts.

        Args:
            prompt: a string or a non-empty list of P strings.
            negative_prompt: None (""), a string for every prompt, or a list of P strings:
                what guidance steers away from.
            height, width: picture size in pixels, multiples of the VAE factor (8); default
                the U-Net's sample_size × 8 (512 for SD v1). Ignored with `image`.
            num_inference_steps: grid length n ≥ 1, at most the scheduler's
                `max_inference_steps`; None for the model's default (`sampling_defaults`).
            guidance_scale: s of classifier-free guidance (Ho & Salimans 2022, SD's
                convention); s = 1 runs one U-Net call per step without the negative half,
                any other s one batched call on [negative, positive]; None for the model's
                default (`sampling_defaults`).
            num_images_per_prompt: pictures per prompt; B = P × this.
            generator: a torch.Generator, or a list of B (one per picture: picture i's
                starting noise, ancestral noise and VAE posterior sample all come from
                generator i, so it equals the run of generator i alone); noise is drawn on
                its device then moved, so a seed gives the same picture on every device.
            seed: shortcut for generator=torch.Generator("cpu").manual_seed(seed).
            scheduler: None (the pipeline's), a name ("ddim", "euler", "euler_ancestral",
                "dpmpp_2m", "ddpm") built on the pipeline's scheduler config (keeping every
                setting the new scheduler understands, see Scheduler.from_config), or a
                Scheduler (not modified: the run uses a copy).
            output_type: 'pil', 'pt' or 'latent' (see `decode`).
            progress: show a tqdm progress bar; False writes nothing.
            callback: called with each StepState.
            image: img2img's starting picture: a PIL image (any mode, see minisd.images), a
                list of them, or a tensor (3, H, W) or (1 or P, 3, H, W) with values in
                [−1, 1] (as minisd.images.load_image returns); H, W multiples of 8.
            strength: with `image`, in [0, 1] (None: 0.8, diffusers' default; given without
                an image, a ValueError): the last int(n·strength) steps of the n-step
                grid run, starting from the picture's latents noised to the first of them
                (found by its position in the grid); 0 steps give the picture back through
                the VAE.
            latents: the starting noise ε (B, 4, H/8, W/8) instead of drawing it; it is
                multiplied by the scheduler's init_noise_sigma (as diffusers does). With
                `image`, the noise added to the picture's latents.
        Returns:
            PipelineOutput(images).
        Raises:
            ValueError or TypeError from `check_inputs`, before any work; the errors of
            `decode`.
        """
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                          guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                          image, strength, latents, output_type)
        run = self._prepare(prompt, negative_prompt, height, width, num_inference_steps,
                            guidance_scale, num_images_per_prompt, generator, seed, scheduler,
                            image, strength, latents)
        final = run.latents     # stays the picture's latents for img2img with no step to run
        for state in self._denoise(run, progress):
            final = state.latents
            if callback is not None:
                callback(state)
        return PipelineOutput(self.decode(final, output_type))

    # ---- checks and set-up ----

    def _with_defaults(self, num_inference_steps, guidance_scale) -> tuple:
        """(n, s): the given values, the model's defaults where None."""
        d = self.sampling_defaults
        return (d.num_inference_steps if num_inference_steps is None else num_inference_steps,
                d.guidance_scale if guidance_scale is None else guidance_scale)

    def check_inputs(self, prompt, negative_prompt=None, height=None, width=None,
                     num_inference_steps=None, guidance_scale=None, num_images_per_prompt=1,
                     generator=None, seed=None, scheduler=None, image=None,
                     strength=None,
                     latents=None, output_type="pil") -> None:
        """Refuse, before any work, every argument that would fail later or do something
        unasked (arguments as in `__call__`; None steps and guidance are the model's).

        Raises:
            TypeError for prompts that are not strings, or an image of another type.
            ValueError naming the argument and what would work: an empty prompt list; prompt
            and negative-prompt lists of different lengths; a step count below 1 or beyond
            the scheduler's grid (naming the limit and the spacing that allows more); a
            guidance scale that is not finite; num_images_per_prompt < 1; both seed and
            generator, a seed outside [0, 2**63) or a generator list of the wrong length
            (TypeError for a generator that is not a torch.Generator);
            height/width not whole multiples of the VAE factor; strength outside [0, 1] or
            without an image; a
            0×0 picture, pictures of different sizes or not multiples of the factor, image
            tensors outside [−1, 1], more pictures than prompts; latents of the wrong shape;
            an unknown output_type or scheduler; a run that needs more memory than the
            device has (`memory_estimate`).
        """
        num_inference_steps, guidance_scale = self._with_defaults(num_inference_steps,
                                                                  guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        prompts = _prompt_list(prompt)
        _negative_list(negative_prompt, len(prompts))
        if not _whole_number(num_inference_steps, 1):
            raise ValueError(f"num_inference_steps must be a whole number ≥ 1, got "
                             f"{num_inference_steps!r}")
        self._scheduler(scheduler).check_num_inference_steps(num_inference_steps)
        if not _finite_number(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (e.g. 7.5), got "
                             f"{guidance_scale!r}")
        if not _whole_number(num_images_per_prompt, 1):
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt!r}")
        batch = len(prompts) * num_images_per_prompt
        _check_generator(generator, seed, batch)
        f = self.vae_scale_factor
        if image is None:
            if strength is not None:
                raise ValueError(f"strength={strength!r} is for img2img: pass the starting "
                                 "picture as image= too, or leave strength out")
            height, width = self._size(height, width)
        else:
            strength = DEFAULT_STRENGTH if strength is None else strength
            if not _finite_number(strength) or not 0 <= strength <= 1:
                raise ValueError(f"strength must lie in [0, 1] (the fraction of the steps run "
                                 f"on the image), got {strength!r}")
            count, height, width = _check_image(image, f)
            if batch % count:
                raise ValueError(f"got {count} images for {batch} pictures; pass one image, "
                                 "or one per prompt")
        if latents is not None:
            shape = self._latent_shape(batch, height, width)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} (pictures, channels, "
                                 f"height/{f}, width/{f}), got {tuple(latents.shape)}")
        self._check_memory(batch, height, width)

    def _size(self, height, width) -> tuple[int, int]:
        """Text-to-image's (height, width): the given ones, checked, or the U-Net's default."""
        f = self.vae_scale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not _whole_number(value, f):
                raise ValueError(f"{name} must be a whole number of pixels, at least {f} and a "
                                 f"multiple of {f} (the VAE's downsampling factor), got {value!r}")
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's "
                             f"downsampling factor), got {height}×{width}; height "
                             f"{nearest_multiples(height, f)}, width "
                             f"{nearest_multiples(width, f)} would work")
        return height, width

    def memory_estimate(self, batch: int, height: int, width: int) -> int:
        """A lower bound, in bytes, of the memory a run of `batch` pictures of height×width
        needs at its peak, the VAE decode at full resolution: the decoder's last ResNet block
        holds its input, that input's GroupNorm and its SiLU at once, three tensors
        (B, C, H, W) of the width C of the decoder's second-to-last level
        (`block_out_channels[1]`: 256 for SD v1) in the VAE's dtype, and the pictures come out
        as (B, 3, H, W) float32. SD v1, one 512×512 picture in float16: 0.41 GB; the bundled
        model on a CPU: 396 bytes per pixel (its decode measured 515)."""
        channels = self.vae.config.block_out_channels
        width_c = channels[1] if len(channels) > 1 else channels[0]
        element = torch.finfo(_dtype(self.vae)).bits // 8
        return batch * height * width * (3 * width_c * element + 3 * 4)

    def _check_memory(self, batch: int, height: int, width: int) -> None:
        needed, available = self.memory_estimate(batch, height, width), _memory(self.device)
        if available is not None and needed > available:
            raise ValueError(f"{batch} picture(s) of {height}×{width} need at least "
                             f"{needed / 2 ** 30:,.1f} GiB (the VAE decode at full size), more "
                             f"than the {available / 2 ** 30:,.1f} GiB of "
                             f"{self.device.type} memory here; draw fewer or smaller pictures")

    def _prepare(self, prompt, negative_prompt, height, width, num_inference_steps,
                 guidance_scale, num_images_per_prompt, generator, seed, scheduler, image,
                 strength, latents) -> "_Run":
        """Set up one run from checked arguments: its own scheduler and grid, the starting
        latents (noise, or the picture's latents noised at the first step run) and the text
        context."""
        num_inference_steps, guidance_scale = self._with_defaults(num_inference_steps,
                                                                  guidance_scale)
        prompts = _prompt_list(prompt)
        batch = len(prompts) * num_images_per_prompt
        generator = _generator(generator, seed)
        scheduler = copy.deepcopy(self._scheduler(scheduler))     # this run's own state
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if image is None:
            shape = self._latent_shape(batch, *self._size(height, width))
            z = self._noise(shape, latents, generator) * scheduler.init_noise_sigma
        else:
            z = self._image_latents(_image_tensor(image), batch, generator)
            strength = DEFAULT_STRENGTH if strength is None else strength
            start = num_inference_steps - int(num_inference_steps * strength)
            timesteps = timesteps[start:]
            if len(timesteps):                       # SDEdit: noise the picture to t_start
                scheduler.set_begin_index(start)
                noise = self._noise(z.shape, latents, generator)
                z = scheduler.add_noise(z, noise, timesteps[:1].repeat(batch))
        context = self.encode_prompt(prompts, _negative_list(negative_prompt, len(prompts)),
                                     num_images_per_prompt,
                                     needs_unconditional_pass(guidance_scale))
        return _Run(scheduler, timesteps, z.to(self.dtype), context.to(self.dtype),
                    guidance_scale, generator)

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple:
        f = self.vae_scale_factor
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def _noise(self, shape: tuple, latents: torch.Tensor | None, generator) -> torch.Tensor:
        if latents is None:
            return randn_tensor(shape, generator, self.device, self.dtype)
        return latents.to(device=self.device, dtype=self.dtype)

    def _scheduler(self, scheduler: str | Scheduler | None) -> Scheduler:
        """The scheduler a run asks for (not yet copied): the pipeline's, one by name built on
        the pipeline's config (diffusers' switching rule, Scheduler.from_config), or the one
        given."""
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            return from_name(scheduler, self.scheduler.config)
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


def _finite_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _whole_number(value, minimum: int) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= minimum)


def nearest_multiples(n: int, f: int) -> str:
    """The multiples of f next to n, to suggest a size: "56 or 64" for n = 60, f = 8; "8" for
    n = 3; n itself when it is one."""
    below, above = n // f * f, (n // f + 1) * f
    return str(n) if n % f == 0 else (f"{below} or {above}" if below else str(above))


def _memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes: the GPU's for CUDA, the machine's RAM otherwise
    (MPS shares it); None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


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


def _check_generator(generator, seed, batch: int) -> None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and not (_whole_number(seed, 0) and seed < 2 ** 63):
        raise ValueError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got "
                        f"{generator!r}; for a number, pass seed={generator!r} instead")
    if isinstance(generator, (list, tuple)) and len(generator) not in (1, batch):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one "
                         "generator, or one per picture")


def _generator(generator, seed: int | None):
    """The run's generator: from `seed`, the one given, or a list of one per picture."""
    if seed is not None:
        return torch.Generator("cpu").manual_seed(seed)
    if isinstance(generator, (list, tuple)):
        return generator[0] if len(generator) == 1 else list(generator)
    return generator


def _check_image(image, f: int) -> tuple[int, int, int]:
    """img2img's picture(s): (count, height, width) after checking them. Errors as in
    `check_inputs`."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(im, Image.Image) for im in image):
            raise TypeError("image must be a PIL image, a non-empty list of them or a tensor")
        sizes = {im.size for im in image}
        if len(sizes) > 1:
            raise ValueError("img2img images must all have the same size")
        (width, height), count = sizes.pop(), len(image)
        if width == 0 or height == 0:
            raise ValueError(f"the image is {width}×{height} pixels: it has no pixels to draw "
                             "from")
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"an image tensor must have shape (3, H, W) or (N, 3, H, W) with "
                             f"H, W ≥ 1, got {tuple(image.shape)}")
        low, high = x.min().item(), x.max().item()
        if not (-1.001 <= low and high <= 1.001):
            raise ValueError(f"image tensors take values in [-1, 1] (minisd.images.load_image's)"
                             f", got {low:g} … {high:g}")
        count, height, width = x.shape[0], x.shape[2], x.shape[3]
    else:
        raise TypeError(f"image must be a PIL image, a list of them or a tensor, "
                        f"got {type(image).__name__}")
    if height % f or width % f:
        raise ValueError(f"the image is {height}×{width}; height and width must be multiples "
                         f"of {f} (resize it to {nearest_multiples(height, f)} × "
                         f"{nearest_multiples(width, f)}, e.g. "
                         "minisd.images.load_image(path, size=(h, w)))")
    return count, height, width


def _image_tensor(image) -> torch.Tensor:
    """A checked PIL image, list of them, or tensor in [−1, 1] → float32 (N, 3, H, W) in
    [−1, 1] (PIL pictures of any mode through minisd.images.image_to_tensor)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        return torch.stack([image_to_tensor(im) for im in image])
    return (image[None] if image.ndim == 3 else image).float()


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
