"""Chapter 2: the variational autoencoder that moves Stable Diffusion into latent space.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (§3.1):
diffusion on 3×512×512 pixels is expensive, so a first-stage autoencoder compresses a
picture x to a latent z of shape 4×64×64 (48× fewer numbers, downsampling factor f = 8)
and the diffusion model works on z. The encoder E outputs the mean μ and log-variance
log σ² of a diagonal Gaussian q(z | x) = N(μ, σ²); training samples
z = μ + σ·ε (the reparameterisation trick of Kingma & Welling 2014) and adds a small
KL(q(z | x) ‖ N(0, I)) penalty ("KL-reg.", §3.1) so the latent space stays well-scaled.
The decoder D maps z back to pixels.

Architecture (as in CompVis' `ldm` autoencoder and diffusers' `AutoencoderKL`, whose
parameter names are used here so a diffusers `vae/` folder loads with strict=True):

    Encoder: conv_in → down blocks (ResNet blocks, then a stride-2 Downsample except in the
             last) → mid block (ResNet → self-attention → ResNet) → GroupNorm, SiLU, conv_out
             to 2 × latent_channels; then quant_conv (1×1).
    Decoder: post_quant_conv (1×1) → conv_in → mid block → up blocks (ResNet blocks, then a
             nearest ×2 Upsample + conv except in the last) → GroupNorm, SiLU, conv_out.

The diffusion model does not see z itself but `scaling_factor · z` (0.18215 for SD v1),
which gives the latents roughly unit variance (Rombach et al. 2022 rescale by 1/σ̂, σ̂ the
standard deviation of a batch of latents). The factor is read from the checkpoint's
config, never hard-coded: `encode_latents` applies it, `decode_latents` removes
it exactly once.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import Attention
from minisd.pretrained import ModelConfig, PretrainedModel, check_positive

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class AutoencoderKLConfig(ModelConfig):
    """The VAE's configuration; fields and defaults are those of diffusers' `AutoencoderKL`
    `config.json`. `from_config` ignores keys it does not know; `to_config` writes them back.

    `block_out_channels` has one entry per resolution level: the downsampling factor is
    2^(levels − 1). Only the block types SD uses exist ("DownEncoderBlock2D",
    "UpDecoderBlock2D") and only `act_fn="silu"`. `shift_factor` (None for SD v1; used by
    later models) is subtracted before scaling. `force_upcast` tells a pipeline to decode in
    float32 (the SD v1 VAE overflows in float16).

    Raises TypeError naming a field of the wrong type (e.g. a string `scaling_factor`);
    ValueError for channels, sizes or `scaling_factor` that are not > 0, inconsistent
    lengths, unknown block types or activations, and channel counts that the GroupNorm
    groups do not divide.
    """

    class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def check(self):
        check_positive(self, "in_channels", "out_channels", "block_out_channels",
                       "layers_per_block", "latent_channels", "norm_num_groups", "sample_size",
                       "scaling_factor")
        if self.shift_factor is not None and not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor must be a finite number or None, got "
                             f"{self.shift_factor!r}")
        levels = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == levels >= 1):
            raise ValueError("down_block_types, up_block_types and block_out_channels need one "
                             f"entry per level, got {len(self.down_block_types)}, "
                             f"{len(self.up_block_types)} and {levels}")
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"),
                              ("up_block_types", "UpDecoderBlock2D")):
            if set(getattr(self, name)) != {allowed}:
                raise ValueError(f"unsupported {name} {getattr(self, name)}; only {allowed!r} "
                                 "is built")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported act_fn {self.act_fn!r}; only 'silu' is built")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def sd_v1(cls) -> "AutoencoderKLConfig":
        """The SD v1.x VAE (`vae/config.json` of runwayml/stable-diffusion-v1-5): 83,653,863
        parameters, f = 8."""
        return cls(down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   sample_size=512)

    def to_config(self) -> dict:
        """A diffusers-style config dict (with `_class_name`), JSON-serialisable."""
        return {"_class_name": self.class_name, **super().to_config()}


def _group_norm(config: AutoencoderKLConfig, channels: int) -> nn.GroupNorm:
    """GroupNorm with the VAE's ε = 1e-6 (as in `ldm` and diffusers)."""
    return nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x)))))), (He et al. 2016;
    the `ldm` ResnetBlock without a time embedding). A 1×1 `conv_shortcut` matches channels
    when they change. Shapes: (B, in_channels, H, W) → (B, out_channels, H, W)."""

    def __init__(self, config: AutoencoderKLConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a 3×3 conv with
    stride 2 and no padding (the `ldm` layout). (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour ×2, then a 3×3 conv (avoids the checkerboard
    artefacts of transposed convolutions). (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(Attention):
    """Self-attention over the pixels of a feature map, with a GroupNorm and a residual:
    x + Attention(GN(x)), one head as wide as the channels, biases on every projection.

    The pixels become a sequence of H·W tokens of width C for `minisd.attention.Attention`
    and are folded back after. Softmax in float32 for half-precision inputs (`upcast`), as
    the SD VAE needs. Keys: `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` (diffusers).
    Shapes: (B, C, H, W) → (B, HW, C) → attention → (B, C, H, W).
    """

    def __init__(self, config: AutoencoderKLConfig, channels: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast=True)
        self.group_norm = _group_norm(config, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class UNetMidBlock2D(nn.Module):
    """The bottleneck at the lowest resolution: ResNet → self-attention → ResNet (the
    attention is left out when `mid_block_add_attention` is False). (B, C, h, w) → same."""

    def __init__(self, config: AutoencoderKLConfig, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(config, channels, channels)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(config, channels)]
                                        if config.mid_block_add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks, then a Downsample2D unless it is the last level.
    (B, in_channels, H, W) → (B, out_channels, H/2, W/2), or H, W when not downsampling."""

    def __init__(self, config, in_channels: int, out_channels: int, num_layers: int,
                 downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(config, in_channels if i == 0
                                                    else out_channels, out_channels)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks, then an Upsample2D unless it is the last level.
    (B, in_channels, h, w) → (B, out_channels, 2h, 2w), or h, w when not upsampling."""

    def __init__(self, config, in_channels: int, out_channels: int, num_layers: int,
                 upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(config, in_channels if i == 0
                                                    else out_channels, out_channels)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nn.Module):
    """Pixels → Gaussian parameters, with f = 2^(levels − 1) and channels c_0 … c_last:

        (B, in_channels, H, W) → conv_in → (B, c_0, H, W) → down blocks → (B, c_last, H/f, W/f)
        → mid block → GN, SiLU, conv_out → (B, 2·latent_channels, H/f, W/f)
    """

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(config, channels[max(i - 1, 0)], c, config.layers_per_block,
                               downsample=i < len(channels) - 1)
            for i, c in enumerate(channels)])
        self.mid_block = UNetMidBlock2D(config, channels[-1])
        self.conv_norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents → pixels, the encoder mirrored (one more ResNet block per level):

        (B, latent_channels, h, w) → conv_in → (B, c_last, h, w) → mid block
        → up blocks → (B, c_0, h·f, w·f) → GN, SiLU, conv_out → (B, out_channels, h·f, w·f)
    """

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(config, channels[0])
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(config, channels[max(i - 1, 0)], c, config.layers_per_block + 1,
                             upsample=i < len(channels) - 1)
            for i, c in enumerate(channels)])
        self.conv_norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    """q(z | x) = N(μ, diag(σ²)), from the encoder's output split along the channels.

    Args:
        parameters: (B, 2C, h, w): μ in the first C channels, log σ² in the last C.
    Attributes: `mean`, `logvar` (clamped to [−30, 20] so σ stays finite, as in `ldm`),
    `std` = exp(½·logvar), `var` = exp(logvar), each (B, C, h, w).
    Raises ValueError when the channel count is odd.
    """

    def __init__(self, parameters: torch.Tensor):
        if parameters.ndim != 4 or parameters.shape[1] % 2:
            raise ValueError("expected (B, 2C, h, w) Gaussian parameters (mean and log-variance "
                             f"stacked on dim 1), got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε with ε ~ N(0, I) drawn from `generator` (reparameterisation trick,
        Kingma & Welling 2014, §2.4), so gradients flow to μ and σ. The noise is drawn on
        the generator's device, then moved, so a seed gives the same z on every device.
        Returns (B, C, h, w)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device,
                          dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, μ: (B, C, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) = ½·Σ(μ² + σ² − 1 − log σ²), summed over (C, h, w)
        (Kingma & Welling 2014, appendix B). Returns (B,), float, ≥ 0."""
        return 0.5 * (self.mean ** 2 + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(PretrainedModel, nn.Module):
    """The KL-regularised autoencoder of latent diffusion, with diffusers' names.

    `encode(x)` → posterior q(z | x); `decode(z)` → pixels. These match diffusers'
    `AutoencoderKL.encode(x).latent_dist` and `.decode(z).sample` (tested) and do not scale.
    `encode_latents` / `decode_latents` work with scaled latents, the diffusion model's space.

    Args:
        config: an `AutoencoderKLConfig` (e.g. `AutoencoderKLConfig.sd_v1()`).
    Files: `from_pretrained(path, subfolder=None, torch_dtype=None)` reads a diffusers `vae/`
    folder (config.json + diffusion_pytorch_model.safetensors), `save_pretrained` writes one,
    `from_config` builds from a config dict (`minisd.pretrained`).
    """

    config_class = AutoencoderKLConfig
    part = "vae"
    weights_names = (WEIGHTS_NAME, "diffusion_pytorch_model.bin")
    ldm_prefixes = ("first_stage_model.", "encoder.down.", "decoder.up.")

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent2 = 2 * config.latent_channels
        self.quant_conv = (nn.Conv2d(latent2, latent2, 1) if config.use_quant_conv else None)
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def downsampling_factor(self) -> int:
        """f = 2^(levels − 1): 8 for SD v1 (diffusers pipelines call it `vae_scale_factor`)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """The latent scale from the config (0.18215 for SD v1)."""
        return self.config.scaling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode pictures into the posterior q(z | x).

        Args:
            x: (B, in_channels, H, W), values in [−1, 1]; H and W multiples of f.
        Returns:
            a DiagonalGaussianDistribution over z of shape (B, latent_channels, H/f, W/f).
        Raises:
            ValueError for a wrong shape or channel count, or H, W not divisible by f
            (naming the nearest sizes that work).
        """
        self._check_images(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents z (B, latent_channels, h, w) into pictures
        (B, out_channels, h·f, w·f), values roughly in [−1, 1] (not clamped). The input is not
        modified. Raises ValueError for a wrong shape or channel count."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            hint = (" (that looks like a picture: encode it first)"
                    if z.ndim == 4 and z.shape[1] == self.config.in_channels else "")
            raise ValueError(f"decode expects latents of shape (B, {self.config.latent_channels}"
                             f", h, w), got {tuple(z.shape)}{hint}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample_posterior: bool = True) -> torch.Tensor:
        """Pictures → the scaled latents a diffusion model sees:
        (z − shift_factor) · scaling_factor, with z sampled from q(z | x) (or its mean when
        `sample_posterior` is False). x (B, in_channels, H, W) in [−1, 1] →
        (B, latent_channels, H/f, W/f). Errors as in `encode`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pictures: divides by scaling_factor exactly once (and adds back
        shift_factor), then decodes; the caller's tensor is not modified.
        (B, latent_channels, h, w) → (B, out_channels, h·f, w·f). Errors as in `decode`."""
        return self.decode(latents / self.scaling_factor + (self.config.shift_factor or 0.0))

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None):
        """Reconstruct: encode, take z (sampled, or the mean by default as in diffusers),
        decode. Returns (reconstruction (B, out_channels, H, W), posterior) for `vae_loss`."""
        posterior = self.encode(sample)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check_images(self, x: torch.Tensor):
        c, f = self.config.in_channels, self.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c:
            hint = " (add a batch dimension: x[None])" if x.ndim == 3 else ""
            raise ValueError(f"encode expects pictures of shape (B, {c}, H, W), "
                             f"got {tuple(x.shape)}{hint}")
        H, W = x.shape[-2:]
        if H % f or W % f:
            def options(n):
                below, above = n // f * f, (n // f + 1) * f
                if n % f == 0:
                    return str(n)
                return f"{below} or {above}" if below else str(above)
            raise ValueError(f"height and width must be multiples of {f} (the downsampling "
                             f"factor), got {H}×{W}; height {options(H)}, width {options(W)} "
                             "would work")


class VAELoss(NamedTuple):
    """`loss` = `reconstruction` + β·`kl`, each a 0-d tensor."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussianDistribution,
             kl_weight: float, reconstruction: str = "l1",
             weight: torch.Tensor | None = None) -> VAELoss:
    """The VAE training objective: reconstruction error + β·KL(q(z | x) ‖ N(0, I)).

    Both terms are summed over each picture (pixels / latent elements) and averaged over
    the batch, as in the `ldm` autoencoder loss, so β means what it means there: SD's VAE
    used β = `kl_weight` = 1e-6 (CompVis latent-diffusion, configs/autoencoder/
    autoencoder_kl_32x32x4.yaml, with LPIPS and a GAN loss on top, left out here). So small
    a β barely regularises: it keeps the latents bounded while reconstruction dominates.
    Larger β pulls q(z | x) towards N(0, I): smoother latents, blurrier pictures.

    Args:
        x, recon: pictures and their reconstructions, both (B, C, H, W).
        posterior: q(z | x) from `encode(x)`.
        kl_weight: β ≥ 0.
        reconstruction: "l1" (|x − x̂|, as `ldm`) or "l2" ((x − x̂)²).
        weight: optional per-pixel weights of the reconstruction error, broadcastable to
            x's shape (e.g. (B, 1, H, W)); None weighs every pixel 1.
    Returns:
        a VAELoss (loss, reconstruction, kl) of 0-d tensors.
    Raises:
        ValueError for mismatched shapes, an unknown reconstruction, a negative β or a
        weight that does not broadcast to x.
    """
    if x.shape != recon.shape:
        raise ValueError(f"x and recon must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(recon.shape)}")
    if reconstruction not in ("l1", "l2"):
        raise ValueError(f"unknown reconstruction {reconstruction!r}; choose 'l1' or 'l2'")
    if kl_weight < 0:
        raise ValueError(f"kl_weight (β) must be ≥ 0, got {kl_weight}")
    error = (recon - x).abs() if reconstruction == "l1" else (recon - x) ** 2
    if weight is not None:
        try:
            fits = torch.broadcast_shapes(weight.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to the "
                             f"pictures' {tuple(x.shape)}")
        error = error * weight
    rec = error.flatten(1).sum(dim=1).mean()
    kl = posterior.kl().mean()
    return VAELoss(rec + kl_weight * kl, rec, kl)
