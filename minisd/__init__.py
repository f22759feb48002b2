"""minisd: Stable Diffusion from scratch, one module per chapter of the course.

The map of the package (notebooks/0N_… teaches module N):

    1  noise.py            β schedules, ᾱ_t, q(x_t | x_0), zero terminal SNR
    2  vae.py              AutoencoderKL: pictures (B, 3, H, W) ↔ latents (B, 4, H/f, W/f)
    3  tokenizer.py        CLIPTokenizer: prompt → 77 token ids (byte-level BPE)
       text_encoder.py     CLIPTextModel: ids → context (B, 77, D), what the U-Net reads
       clip_contrastive.py CLIPModel: text and image towers trained together (how CLIP learns)
    4  unet.py             UNet2DConditionModel: ε_θ(z_t, t, context)
       attention.py        the one attention (self- and cross-), on scaled_dot_product_attention
       attention_maps.py   per-word cross-attention maps, for plots
    5  schedulers.py       DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ (2M)
       guidance.py         classifier-free guidance
    6  pipeline.py         StableDiffusionPipeline: the five parts assembled

    pretrained.py                   the loader contract of every model, the tokenizer, schedulers
    state_dict.py                   weight files read safely, state dicts loaded strictly
    checkpoints.py                  whole models: diffusers folders, SD v1 single files
    images.py                       pictures in and out (files, PIL ↔ tensors in [−1, 1])
    package_data.py                 where the shipped files are (vocabulary, photos, bundled model)
    viz.py                          plots and widgets of the notebooks
    shapes/                         the shapes world (world.py) and its judge (evaluate.py)
    training/                       the training loop, EMA, one recipe per model, their command line
    __main__.py                     `python -m minisd "a prompt"`

From prompt to picture (pipeline.py):

    prompt ─tokenizer─▶ ids (B, 77) ─text_encoder─▶ context (B, 77, D) ─┐
    noise z_T (B, 4, h, w) ─▶ for t in scheduler.timesteps:             ▼
                                 ε̂ = guidance(unet(z_t, t, context)); z_t ← scheduler.step(ε̂, t, z_t)
    z_0 ─vae.decode─▶ picture (B, 3, H, W) in [−1, 1]

The names are diffusers' and transformers', so `from minisd import StableDiffusionPipeline`
reads like the library it teaches.
"""

from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from minisd.text_encoder import CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL

__all__ = [
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTokenizer",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "StableDiffusionPipeline",
    "UNet2DConditionModel",
]
