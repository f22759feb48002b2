"""Chapter 4: the U-Net that predicts the noise, ε_θ(z_t, t, c).

Stable Diffusion denoises in the VAE's latent space (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", §3.3): a U-Net (Ronneberger et al. 2015) reads
the noisy latent z_t (B, 4, H/8, W/8), the timestep t and the text context c (B, 77, 768)
and returns the predicted noise ε, the same shape as z_t. Trained with DDPM's loss
‖ε − ε_θ(z_t, t, c)‖² (Ho et al. 2020, eq. 14).

The pieces, from the bottom up:

- `timestep_embedding`: t as sines and cosines of geometric frequencies (the positional
  encoding of Vaswani et al. 2017, §3.5), then a two-layer MLP (`TimestepEmbedding`).
- `ResnetBlock2D`: GroupNorm → SiLU → conv, plus the projected time embedding, then
  GroupNorm → SiLU → conv, plus a skip connection. Every ResNet block sees t.
- `Transformer2DModel`: the picture's pixels become tokens; each `BasicTransformerBlock`
  is self-attention among pixels, cross-attention from pixels (queries) to the words
  (keys, values), and a GEGLU feed-forward, each normalised and residual.
- `DownBlock2D` / `UpBlock2D`: ResNet blocks (each followed by a transformer where the
  config asks for attention), then a stride-2 conv down or a nearest-neighbour upsample;
  the up path concatenates the down path's outputs (the U's skip connections).
  `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet at the lowest resolution.

SD v1 works at four widths, 320, 640, 1280, 1280, on a latent (B, 4, H, W) (64×64 for
512×512 pictures) and its halvings: (B, 320, H, W), (B, 640, H/2, W/2), (B, 1280, H/4, W/4),
(B, 1280, H/8, W/8), down and back up; `UNet2DConditionModel` lists every stage. Strided
convs round up (11 → 6 → 3 → 2) and every upsample goes to the exact size of the skip it
meets, so any latent size works, not only multiples of 8.

Class, argument, config and parameter names are those of diffusers'
`UNet2DConditionModel`, so a diffusers `unet/` folder loads with `strict=True`; outputs match
diffusers' to float32 rounding (tests/test_unet.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import Attention
from minisd.pretrained import ModelConfig, PretrainedModel, check_positive, naming

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys for U-Net variants minisd does not build, with the one value it does
# build (diffusers' default). A config asking for anything else is refused, not misread.
_FIXED_CONFIG = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1, "dropout": 0.0, "act_fn": "silu", "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "reverse_transformer_layers_per_block": None,
}


@dataclass
class UNet2DConditionConfig(ModelConfig):
    """The U-Net's hyper-parameters, named as in diffusers' `unet/config.json`.

    The defaults are Stable Diffusion v1 (859,520,964 parameters); they equal diffusers'
    constructor defaults except `cross_attention_dim` (768, CLIP ViT-L/14's width, where
    diffusers defaults to 1280) and `sample_size` (64 latents = 512 pixels).

    Per-level fields (`layers_per_block`, `transformer_layers_per_block`,
    `attention_head_dim`, `only_cross_attention`) take one value for every level or a tuple
    with one value per down block; the up path reads them in reverse.

    Attention is chosen per level by the block types, as in diffusers:
    `CrossAttnDownBlock2D`/`CrossAttnUpBlock2D` put a `Transformer2DModel` after each ResNet
    block, `DownBlock2D`/`UpBlock2D` have none. The mid block always has one. With
    `only_cross_attention` True at a level, its transformers' first attention also reads the
    text instead of the pixels (no self-attention there; cheap at high resolution).

    Heads: for historical reasons diffusers' U-Net reads `attention_head_dim` as the NUMBER
    of heads, each of size channels / heads (SD v1: 8 heads of 40, 80, 160, 160 channels;
    SD v2: attention_head_dim = (5, 10, 20, 20), i.e. heads of 64 channels).
    `num_attention_heads` must stay None: diffusers refuses it (its issue #2011), so a config
    that sets it would not load there.

    Raises TypeError naming a field of the wrong type (e.g. a per-level `cross_attention_dim`:
    minisd has one text context width); ValueError (naming the field) for channels, sizes,
    layers or heads that are not > 0, more heads than channels, inconsistent lengths,
    unknown block types, channels not divisible by `norm_num_groups`, or a non-None
    `num_attention_heads`.
    """

    class_name = "UNet2DConditionModel"

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False

    def check(self):
        check_positive(self, "sample_size", "in_channels", "out_channels", "block_out_channels",
                       "layers_per_block", "mid_block_scale_factor", "norm_num_groups",
                       "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                       "attention_head_dim")
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({levels}) "
                             "must have the same length, one entry per level")
        for name, known in (("down_block_types", DOWN_BLOCK_TYPES),
                            ("up_block_types", UP_BLOCK_TYPES)):
            for block_type in getattr(self, name):
                if block_type not in known:
                    raise ValueError(f"unknown {name} entry {block_type!r}; "
                                     f"minisd builds {', '.join(known)}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                     "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(f"{name} has {len(value)} entries for {levels} levels; "
                                 "give one value or one per level")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        for channels, heads in zip(self.block_out_channels, self.per_level("attention_head_dim")):
            if heads > channels:
                raise ValueError(f"attention_head_dim {heads} (the number of heads) exceeds the "
                                 f"{channels} channels of its level")
        if self.num_attention_heads is not None:
            raise ValueError("num_attention_heads must be None: diffusers' U-Net reads the "
                             "number of heads from attention_head_dim; set that instead")

    def per_level(self, name: str) -> tuple:
        """A per-level field as a tuple with one entry per down block."""
        value = getattr(self, name)
        return (value,) * len(self.block_out_channels) if isinstance(value, (int, bool)) \
            else value

    @classmethod
    def from_config(cls, config: dict, source=None) -> "UNet2DConditionConfig":
        """Build from a diffusers `config.json` dict; keys minisd does not use are ignored.

        Raises ValueError if the config asks for a U-Net variant minisd does not build
        (e.g. class embeddings, SDXL's added embeddings), naming the key (and `source`, the
        file); otherwise as `ModelConfig.from_config`.
        """
        with naming(source):
            for key, value in config.items():
                if key in _FIXED_CONFIG and value != _FIXED_CONFIG[key]:
                    raise ValueError(f"config {key}={value!r} is not supported by minisd's "
                                     f"U-Net (only {_FIXED_CONFIG[key]!r}, as in SD v1 and v2)")
        return super().from_config(config, source)

    def to_config(self) -> dict:
        """The config as a diffusers `config.json` dict (with `_class_name`)."""
        return {"_class_name": self.class_name, **super().to_config()}


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps: (B,) → (B, dim), float32.

    With half = dim // 2 and frequencies f_i = max_period^(−i / (half − freq_shift)),
    i = 0 … half−1, the embedding is [sin(t·f), cos(t·f)], or [cos(t·f), sin(t·f)] with
    `flip_sin_to_cos` (SD: True, freq_shift 0). Vaswani et al. 2017, §3.5, applied to t as in
    DDPM; matches diffusers' `get_timestep_embedding`. Timesteps may be fractional.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device)
                      / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = angles.sin(), angles.cos()
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: linear_1 → SiLU → linear_2.

    (B, in_channels) → (B, time_embed_dim); SD v1: 320 → 1280.
    """

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """A residual block conditioned on the time embedding (Ho et al. 2020, App. B).

    h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb)) (broadcast over H, W),
    h = conv2(SiLU(norm2(h))), out = (shortcut(x) + h) / output_scale_factor, where the
    shortcut is a 1×1 conv when the channel count changes.

    Shapes: x (B, in_channels, H, W), temb (B, temb_channels) → (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int,
                 groups: int = 32, eps: float = 1e-5, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) \
            if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, eq. 5): proj to 2·dim_out, split in (a, g),
    return a · GELU(g). (B, N, dim_in) → (B, N, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4·dim, then back to dim: `net.0` GEGLU, `net.1` dropout, `net.2` linear
    (diffusers' key layout). (B, N, dim) → (B, N, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Three residual sub-blocks on pixel tokens x (B, N, dim), N = H·W:

        x = x + attn1(norm1(x))            self-attention among pixels
        x = x + attn2(norm2(x), context)   cross-attention: Q from pixels, K, V from words
        x = x + ff(norm3(x))               GEGLU feed-forward

    (Vaswani et al. 2017 with pre-LayerNorm; Rombach et al. 2022, §3.3.) With
    `only_cross_attention`, attn1 reads the context too. context (B, M, cross_attention_dim).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None,
                               heads, head_dim, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, head_dim,
                               upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Attention on a feature map: GroupNorm, proj_in to tokens, transformer blocks,
    proj_out, plus the input (residual).

    proj_in/proj_out are 1×1 convs (SD v1) or linear layers (`use_linear_projection`, SD v2);
    the two are the same map, stored with different weight shapes. Inner width
    heads · (channels // heads).

    Shapes: x (B, C, H, W) → tokens (B, H·W, inner) → (B, C, H, W); context (B, M, D).
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, num_layers: int = 1,
                 norm_num_groups: int = 32, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear_projection \
            else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim,
                                  only_cross_attention, upcast_attention)
            for _ in range(num_layers)])
        self.proj_out = nn.Linear(inner, channels) if use_linear_projection \
            else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    """3×3 conv with stride 2: (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size` (the skip's H, W), then a 3×3 conv:
    (B, C, h, w) → (B, C, *size)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock2D(nn.Module):
    """One level of the down path: `num_layers` ResNet blocks, each followed by a
    `Transformer2DModel` when `attention` (a dict of its arguments) is given (diffusers'
    CrossAttnDownBlock2D; without it, DownBlock2D), then a stride-2 conv unless last.

    Shapes: x (B, in_channels, H, W) → (B, out_channels, ⌈H/2⌉, ⌈W/2⌉) (or H, W if last).
    Returns (x, skips): the output of every ResNet(+transformer) and of the downsampler,
    for the up path.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 add_downsample: bool, groups: int, eps: float, attention: dict | None = None):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups, eps) for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_channels, norm_num_groups=groups, **attention)
            for _ in range(num_layers)]) if attention is not None else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) \
            if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """The bottom of the U: ResNet → Transformer2DModel → ResNet, at the lowest resolution.
    (B, C, h, w) → (B, C, h, w); SD v1: C = 1280, h = H/8."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float, attention: dict):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor)
            for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(channels, norm_num_groups=groups, **attention)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock2D(nn.Module):
    """One level of the up path: `num_layers` ResNet blocks, each reading the current
    tensor concatenated with a skip from the down path (channels add up), each followed by
    a `Transformer2DModel` when `attention` is given (diffusers' CrossAttnUpBlock2D; without
    it, UpBlock2D), then an upsample to the next skip's size unless last.

    Skip channels: the last ResNet's skip has `in_channels` (the level below's width), the
    others `out_channels`; the first ResNet reads `prev_output_channel` from the block below.
    Shapes: x (B, prev_output_channel, h, w) → (B, out_channels, *upsample_size).
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, num_layers: int, add_upsample: bool, groups: int,
                 eps: float, attention: dict | None = None):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            x_channels = prev_output_channel if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(x_channels + skip_channels, out_channels,
                                              temb_channels, groups, eps))
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_channels, norm_num_groups=groups, **attention)
            for _ in range(num_layers)]) if attention is not None else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(PretrainedModel, nn.Module):
    """The conditional U-Net ε_θ(z_t, t, c) of Stable Diffusion, diffusers' names and layout.

    Stages (SD v1, latent (B, 4, H, W), C0 = 320):
        t → timestep_embedding (B, 320) → time_embedding (B, 1280)
        conv_in             (B, 320, H, W)
        down_blocks[0..3]   (B, 320, H/2, W/2), (B, 640, H/4, W/4), (B, 1280, H/8, W/8),
                            (B, 1280, H/8, W/8)  (with attention in the first three)
        mid_block           (B, 1280, H/8, W/8)
        up_blocks[0..3]     (B, 1280, H/4, W/4), (B, 1280, H/2, W/2), (B, 640, H, W),
                            (B, 320, H, W)        (with attention in the last three)
        conv_norm_out → SiLU → conv_out  (B, 4, H, W)
    (H/2 etc. round up for odd sizes.)

    Build from a `UNet2DConditionConfig` (or a config dict, `from_config`), or load a
    diffusers `unet/` folder with `from_pretrained(path, subfolder=None, torch_dtype=None)`
    (`minisd.pretrained`); `save_pretrained` writes one.
    """

    config_class = UNet2DConditionConfig
    part = "unet"
    ldm_prefixes = ("model.diffusion_model.", "input_blocks.", "middle_block.", "output_blocks.")

    def __init__(self, config: UNet2DConditionConfig | None = None):
        super().__init__()
        self.config = config = config or UNet2DConditionConfig()
        channels = config.block_out_channels
        levels = len(channels)
        temb_channels = channels[0] * 4
        groups, eps = config.norm_num_groups, config.norm_eps
        layers = config.per_level("layers_per_block")
        heads = config.per_level("attention_head_dim")
        depth = config.per_level("transformer_layers_per_block")
        only_cross = config.per_level("only_cross_attention")

        def attention(level: int, for_block: bool = True) -> dict:
            return {"heads": heads[level], "cross_attention_dim": config.cross_attention_dim,
                    "num_layers": depth[level],
                    "use_linear_projection": config.use_linear_projection,
                    "only_cross_attention": only_cross[level] if for_block else False,
                    "upcast_attention": config.upcast_attention}

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock2D(
                channels[max(i - 1, 0)], channels[i], temb_channels, layers[i],
                add_downsample=i < levels - 1, groups=groups, eps=eps,
                attention=attention(i) if block_type == "CrossAttnDownBlock2D" else None))

        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], temb_channels, groups, eps, config.mid_block_scale_factor,
            attention(levels - 1, for_block=False))

        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            level = levels - 1 - i  # the up path walks the levels in reverse
            self.up_blocks.append(UpBlock2D(
                channels[max(level - 1, 0)], channels[min(level + 1, levels - 1)],
                channels[level], temb_channels, layers[level] + 1,
                add_upsample=level > 0, groups=groups, eps=eps,
                attention=attention(level) if block_type == "CrossAttnUpBlock2D" else None))

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        """Predict the noise in `sample`.

        Args:
            sample: noisy latents z_t (B, in_channels, H, W), any H, W ≥ 1.
            timestep: t, an int/float, a 0-d tensor (the same t for the whole batch) or a
                (B,) tensor; fractional values are allowed (some samplers use them).
            encoder_hidden_states: text context (B, M, cross_attention_dim), e.g. CLIP's
                last hidden state (B, 77, 768).
        Returns:
            ε̂ (B, out_channels, H, W), the dtype of `sample`.
        Raises:
            ValueError for a wrong number of latent channels, a context of the wrong width,
            mismatched batch sizes or a timestep tensor of the wrong shape.
        """
        config = self.config
        t = self._check_inputs(sample, timestep, encoder_hidden_states)   # (B,)
        temb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos,
                                  config.freq_shift).to(sample.dtype)
        temb = self.time_embedding(temb)                      # (B, 4·C0)

        x = self.conv_in(sample)                              # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:                        # (B, C_i, H/2^i, W/2^i)
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)    # (B, C_last, lowest H, W)
        for block in self.up_blocks:                          # back up, level by level
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None    # the next level's exact size
            x = block(x, block_skips, temb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))   # (B, out_channels, H, W)

    def _check_inputs(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        """The checks of `forward` (shapes only, no device sync); returns t as a (B,) tensor."""
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"sample must have shape (B, {config.in_channels}, H, W), got "
                             f"{tuple(sample.shape)}; pass VAE latents, not pixels")
        B = sample.shape[0]
        if encoder_hidden_states.ndim != 3 \
                or encoder_hidden_states.shape[-1] != config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must have shape (B, M, "
                             f"{config.cross_attention_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}; the text encoder's width "
                             "must equal the U-Net's cross_attention_dim")
        if encoder_hidden_states.shape[0] != B:
            raise ValueError(f"batch sizes differ: sample has {B}, encoder_hidden_states has "
                             f"{encoder_hidden_states.shape[0]}; repeat the context per latent")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(B)
        if t.shape != (B,):
            raise ValueError(f"timestep must be a number or have shape ({B},), "
                             f"got shape {tuple(t.shape)}")
        return t
