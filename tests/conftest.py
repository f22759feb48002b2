"""Test-wide settings and shared helpers.

Nothing may reach the network: the hub clients stay offline. The helpers build tiny models
that several test files use (`from conftest import tiny_pipeline`)."""

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import torch
from torch import nn

from minisd.clip_contrastive import CLIPConfig, CLIPImageConfig
from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import from_name
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


def tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with the 512 byte symbols, a few merges and the two specials:
    521 ids, so a text model with a tiny embedding table can read it."""
    symbols = list(bytes_to_unicode().values())
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>"]
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
              BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges)


def tiny_pipeline(scheduler: str = "dpmpp_2m", seed: int = 0) -> StableDiffusionPipeline:
    """SD v1's shape (4 U-Net levels with attention in the first three, 4 VAE levels: f = 8)
    at widths of 8–16 channels: 64×64 pictures from 8×8 latents, ~0.3 M parameters."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2))
    vae = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
        sample_size=64))
    return StableDiffusionPipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval(),
                                   from_name(scheduler, SD_SCHEDULE))


class StandInUNet(nn.Module):
    """A stand-in for the U-Net with a given config (sample_size, in_channels): it returns
    `eps` (repeated over the batch), or 0.1·input without one, and records every call's input
    and timestep in `calls`."""

    def __init__(self, config, eps: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))   # gives the pipeline a device and dtype
        self.eps = eps
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.calls.append((sample.clone(), timestep))
        if self.eps is None:
            return 0.1 * sample
        return self.eps.repeat(sample.shape[0] // self.eps.shape[0], 1, 1, 1)


class StandInVAE(nn.Module):
    """A stand-in VAE with f = 8: a picture's latents are the mean of each 8×8 block of its
    first channel, in 4 channels (no posterior noise)."""

    downsampling_factor = 8
    config = SimpleNamespace(block_out_channels=(8,))

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def encode_latents(self, x, generator=None):
        return nn.functional.avg_pool2d(x[:, :1], 8).repeat(1, 4, 1, 1)


class StandInTextEncoder(nn.Module):
    """Any ids → a context of zeros (B, 77, 4)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return SimpleNamespace(last_hidden_state=torch.zeros(ids.shape[0], 77, 4))


def stand_in_pipeline(scheduler, eps: torch.Tensor | None = None) -> StableDiffusionPipeline:
    """A pipeline whose parts all stand in (tokenizer, text encoder, U-Net, VAE) around a real
    scheduler: a run costs little more than the scheduler's steps. 8×8 pictures, 1×1 latents
    by default."""
    def tokenizer(texts):
        return torch.zeros(len(texts), 77, dtype=torch.int64)

    unet = StandInUNet(SimpleNamespace(sample_size=1, in_channels=4), eps)
    return StableDiffusionPipeline(StandInVAE(), StandInTextEncoder(), tokenizer, unet,
                                   scheduler)


def tiny_config() -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, projection_dim=8,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                          pad_token_id=39, bos_token_id=38, eos_token_id=39)
    image = CLIPImageConfig(image_size=16, block_out_channels=(8, 16), hidden_size=12,
                            norm_num_groups=4)
    return CLIPConfig(text, image, projection_dim=8)


def tiny_batch(n: int = 3):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 38, (n, 12), generator=generator)
    ids[:, 0], ids[:, 7:] = 38, 39
    return ids, torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1


def torchrun(*args: str) -> str:
    """Run `torchrun --standalone --nproc_per_node=2 *args` on CPU; return its stdout.
    On a hang, the whole process group is killed after 120 s."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    return stdout
