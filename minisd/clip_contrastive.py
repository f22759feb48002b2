"""CLIP: a text tower and an image tower trained to agree (Radford et al. 2021).

CLIP learns from (picture, caption) pairs alone. Both towers end in a vector of the same
width P; a batch of N pairs gives an N×N matrix of cosine similarities, and the loss asks
each picture to pick its own caption among the N (and each caption its own picture):

    I = normalise(W_i · image_tower(pictures))                          (N, P)
    T = normalise(W_t · text_tower(ids).pooler_output)                  (N, P)
    logits = exp(t) · T Iᵀ                                              (N texts, N images)
    loss = ½ (CE(logits, diag) + CE(logitsᵀ, diag))       symmetric InfoNCE (§2.3, Fig. 3)

with t a learned log inverse temperature (`logit_scale`, initialised to ln(1/0.07) and
capped at ln 100, as in the paper). Nothing tells the model what "red" or "left" means; it
finds out because those words are what separates a caption from the other N − 1.

Stable Diffusion keeps only the text tower (minisd/text_encoder.py), frozen, and reads its
`last_hidden_state`. This module adds what training it needs: a small convolutional image
tower (`CLIPImageEncoder`), the two projections and the temperature (`CLIPModel`, top-level
names as in transformers' `CLIPModel`: text_model, vision_model, text_projection,
visual_projection, logit_scale), and the loss (`clip_loss`). The image tower is minisd's own
(OpenAI's towers are ResNets and ViTs far too large for a CPU): it keeps a 4×4 grid of
features to the end, so where an object is survives into the image vector.

Files: `save_pretrained(folder)` writes the text tower as ``folder/text_encoder/``
(transformers' CLIPTextModel format, what the U-Net reads) and everything else as
``folder/clip_image/`` (``config.json`` + ``model.safetensors``).
"""

import copy
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from minisd.pretrained import (
    CONFIG_NAME,
    ModelConfig,
    PretrainedModel,
    check_dtype,
    check_positive,
    find_folder,
    read_json,
    require_file,
)
from minisd.state_dict import read_state_dict
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel

__all__ = ["CLIPConfig", "CLIPImageConfig", "CLIPImageEncoder", "CLIPModel", "CLIPOutput",
           "clip_loss"]

IMAGE_FOLDER, TEXT_FOLDER = "clip_image", "text_encoder"
# Pictures are in [−1, 1]; resampling (bicubic, Lanczos) may overshoot a little, so the image
# tower refuses only values beyond ±PIXEL_LIMIT, which 0–255 pixels reach unless nearly black.
PIXEL_LIMIT = 1.5


@dataclass
class CLIPImageConfig(ModelConfig):
    """The image tower: per stage a 3×3 convolution at full resolution, then a 2×2 max-pool;
    then a linear map of the flattened feature grid. With the defaults:
    (B, 3, 64, 64) → (B, 16, 32, 32) → (B, 32, 16, 16) → (B, 64, 8, 8) → (B, 128, 4, 4)
    → (B, 128).

    image_size: side of the square input; num_channels: its channels; block_out_channels:
    channels of each stage; hidden_size: width of the image vector; norm_num_groups:
    GroupNorm groups (must divide every channel count).
    Raises TypeError naming a field of the wrong type; ValueError naming the field for sizes
    that are not > 0 or do not divide.
    """

    image_size: int = 64
    num_channels: int = 3
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    hidden_size: int = 128
    norm_num_groups: int = 8

    def check(self):
        check_positive(self, "image_size", "num_channels", "block_out_channels", "hidden_size",
                       "norm_num_groups")
        stages = len(self.block_out_channels)
        if self.image_size % 2 ** stages:
            raise ValueError(f"image_size {self.image_size} does not halve {stages} times "
                             f"(one per stage of block_out_channels); use a multiple of "
                             f"{2 ** stages}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide the "
                             f"channels {self.block_out_channels}")

    @property
    def grid_size(self) -> int:
        """Side of the last feature grid (4 with the defaults)."""
        return self.image_size // 2 ** len(self.block_out_channels)


@dataclass
class CLIPConfig(ModelConfig):
    """Both towers and the joint space. `projection_dim` (P) and `logit_scale_init_value`
    (ln(1/0.07) = 2.6592) are transformers' `CLIPConfig` names and defaults' meaning.
    Raises TypeError or ValueError naming the field, as the towers' configs do."""

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    image_config: CLIPImageConfig = field(default_factory=CLIPImageConfig)
    projection_dim: int = 64
    logit_scale_init_value: float = math.log(1 / 0.07)

    def check(self):
        check_positive(self, "projection_dim")
        if not math.isfinite(self.logit_scale_init_value):
            raise ValueError(f"logit_scale_init_value must be finite, got "
                             f"{self.logit_scale_init_value!r}")

    @classmethod
    def from_config(cls, config: dict, source=None) -> "CLIPConfig":
        """From a config dict, the towers' configs as nested dicts (or dataclasses); unknown
        keys are ignored. Errors as `ModelConfig.from_config`, naming the tower's key."""
        config = dict(config)
        for key, tower in (("text_config", CLIPTextConfig), ("image_config", CLIPImageConfig)):
            if isinstance(config.get(key), dict):
                config[key] = tower.from_config(config[key], source and f"{source}, {key}")
        return super().from_config(config, source)


class CLIPImageEncoder(nn.Module):
    """The image tower (see `CLIPImageConfig`): pixels (B, C, H, W) in [−1, 1] → (B, hidden).

    Per stage: 3×3 conv (stride 1) → GroupNorm → SiLU → 2×2 max-pool, which halves H and W.
    Full-resolution convolutions see the few pixels by which a small circle differs from a
    small square, and the max-pool keeps a detected corner wherever it lies in its window
    (a tower that downsampled with strided convolutions from the start learned shapes far
    more slowly). Then the whole feature grid is flattened (not averaged, so where an object
    is survives) → LayerNorm → linear `proj` to hidden_size.
    Raises TypeError for pictures that are not a float tensor (e.g. uint8); ValueError for
    an empty batch, pictures of the wrong channel count or size, or values clearly outside
    [−1, 1] (beyond ±`PIXEL_LIMIT`, e.g. 0–255; resampling may overshoot ±1 a little),
    the range checked on CPU pictures (no device sync per training batch).
    """

    def __init__(self, config: CLIPImageConfig):
        super().__init__()
        self.config = config
        channels = (config.num_channels, *config.block_out_channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1),
                          nn.GroupNorm(config.norm_num_groups, c_out), nn.SiLU(),
                          nn.MaxPool2d(2))
            for c_in, c_out in itertools.pairwise(channels))
        features = channels[-1] * config.grid_size ** 2
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixel_values)
        x = pixel_values
        for block in self.blocks:
            x = block(x)                                        # (B, c, H/2, W/2)
        return self.proj(self.norm(x.flatten(1)))               # (B, hidden)

    def _check_pixels(self, pixel_values):
        """The checks of `forward`. The value range is checked where that needs no device
        sync (on the CPU); pictures on an accelerator are checked for type and shape only."""
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pictures must be a torch.Tensor (B, C, H, W) in [-1, 1], got "
                            f"{type(pixel_values).__name__}; convert with torch.as_tensor")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pictures must be a float tensor in [-1, 1], got "
                            f"{pixel_values.dtype}; convert 0–255 pixels with "
                            "pixels.float() / 127.5 - 1")
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pictures must have shape (B, {', '.join(map(str, expected))}),"
                             f" got {tuple(pixel_values.shape)}")
        if len(pixel_values) == 0:
            raise ValueError("no pictures: the batch is empty, shape "
                             f"{tuple(pixel_values.shape)}; give at least one")
        if pixel_values.device.type == "cpu" and pixel_values.detach().abs().max() > PIXEL_LIMIT:
            low, high = pixel_values.detach().aminmax()
            raise ValueError(f"pictures must lie in [-1, 1], got values {float(low):.4g}…"
                             f"{float(high):.4g}; "
                             "map 0–255 pixels with x / 127.5 - 1 and 0–1 pixels with "
                             "x * 2 - 1")


class CLIPOutput(NamedTuple):
    """logits_per_text (N_text, N_image) and logits_per_image (its transpose): exp(t)·cosine
    similarity; text_embeds (N_text, P), image_embeds (N_image, P): unit vectors."""

    logits_per_text: torch.Tensor
    logits_per_image: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor


class CLIPModel(PretrainedModel, nn.Module):
    """CLIP with minisd's text tower and a small image tower (module docstring).

    Projections start N(0, width^−1) (OpenAI's `text_projection` init), logit_scale at
    `logit_scale_init_value`. Use `forward` for similarities, `clip_loss` for the loss.
    Files: `from_pretrained(path, subfolder=None, torch_dtype=None)`, `from_config`,
    `save_pretrained` (`minisd.pretrained`), in the two-folder layout of the module docstring.
    """

    config_class = CLIPConfig
    weights_names = ("model.safetensors",)

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        text_width = config.text_config.hidden_size
        image_width = config.image_config.hidden_size
        self.text_model = CLIPTextModel(config.text_config)
        self.vision_model = CLIPImageEncoder(config.image_config)
        self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(image_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        nn.init.normal_(self.text_projection.weight, std=text_width ** -0.5)
        nn.init.normal_(self.visual_projection.weight, std=image_width ** -0.5)

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) int64 → W_t · pooler_output: (B, P), not normalised."""
        return self.text_projection(self.text_model(input_ids).pooler_output)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pictures (B, 3, 64, 64) in [−1, 1] → W_i · image vector: (B, P), not normalised."""
        return self.visual_projection(self.vision_model(pixel_values))

    def similarity_logits(self, text_embeds: torch.Tensor,
                          image_embeds: torch.Tensor) -> torch.Tensor:
        """exp(t) · T Iᵀ for unit vectors T (N_text, P) and I (N_image, P): (N_text, N_image).
        t is capped at ln 100 (Radford et al. 2021, §2.5), without gradient above the cap."""
        return self.logit_scale.clamp(max=math.log(100)).exp() * text_embeds @ image_embeds.T

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> CLIPOutput:
        """Similarities of every caption (B_t, L) int64 with every picture (B_i, 3, 64, 64),
        float in [−1, 1]. Raises the errors of `CLIPTextModel.forward` for bad ids and of
        `CLIPImageEncoder` for bad pictures (uint8, 0–255, wrong size)."""
        text_embeds = F.normalize(self.get_text_features(input_ids), dim=-1)
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        logits = self.similarity_logits(text_embeds, image_embeds)
        return CLIPOutput(logits, logits.T, text_embeds, image_embeds)

    # ---- files ----

    @classmethod
    def load_config(cls, path: str | Path, subfolder: str | None = None) -> CLIPConfig:
        """The config of a CLIP model folder: ``clip_image/config.json`` with the text tower's
        ``text_encoder/config.json``. Errors as in `from_pretrained`."""
        folder = find_folder(path, subfolder, None, (f"{IMAGE_FOLDER}/{CONFIG_NAME}",))
        config_path = folder / IMAGE_FOLDER / CONFIG_NAME
        image = read_json(config_path, cls._folder_description())
        text = CLIPTextModel.load_config(folder, TEXT_FOLDER)
        return CLIPConfig.from_config({**image, "text_config": text}, config_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, *,
                        trust_pickle: bool = False) -> "CLIPModel":
        """Load ``text_encoder/`` and ``clip_image/`` of a CLIP model folder (`path`, or
        `path/subfolder`), as `save_pretrained` writes them; the loader contract of
        `minisd.pretrained` (float32 by default, eval mode).
        Raises FileNotFoundError naming a missing folder or file; ValueError naming the file
        for a bad config (and its key), damaged weights or weights that do not fit."""
        torch_dtype = check_dtype(torch_dtype)
        config = cls.load_config(path, subfolder)
        folder = find_folder(path, subfolder, None, (f"{IMAGE_FOLDER}/{CONFIG_NAME}",))
        text = CLIPTextModel.from_pretrained(folder, TEXT_FOLDER, trust_pickle=trust_pickle)
        weights = require_file(folder / IMAGE_FOLDER, cls.weights_names,
                               cls._folder_description())
        state = {**read_state_dict(weights, trust_pickle),
                 **{"text_model." + k: v for k, v in text.state_dict().items()}}
        return cls.from_state_dict(config, state, str(weights), torch_dtype=torch_dtype)

    @classmethod
    def _folder_description(cls) -> str:
        return (f"a CLIP model folder holds {TEXT_FOLDER}/ and {IMAGE_FOLDER}/ (with "
                f"{CONFIG_NAME} and {cls.weights_names[0]}), as CLIPModel.save_pretrained "
                "writes them")

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``folder/text_encoder/`` (`CLIPTextModel.save_pretrained`) and
        ``folder/clip_image/`` (config.json: projection_dim, logit_scale_init_value,
        image_config; model.safetensors: vision_model.*, the projections, logit_scale),
        with weights stored as `dtype` (float16 by default: half the bytes; loading
        converts back to float32). Returns the folder."""
        folder = Path(folder)
        copy.deepcopy(self.text_model).to(dtype).save_pretrained(folder / TEXT_FOLDER)
        (folder / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.to_config().items() if k != "text_config"}
        (folder / IMAGE_FOLDER / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().to(dtype).contiguous().cpu()
                   for k, v in self.state_dict().items() if not k.startswith("text_model.")}
        save_file(tensors, folder / IMAGE_FOLDER / self.weights_names[0],
                  metadata={"format": "pt"})
        return folder


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3) on an (N, N) matrix whose
    row i and column i belong to pair i: the mean of the cross-entropy of each caption over
    the pictures (rows) and of each picture over the captions (columns).
    Returns a scalar. Raises ValueError for a matrix that is not square."""
    if logits_per_text.ndim != 2 or logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(f"clip_loss needs a square (N, N) matrix of pairs, got "
                         f"{tuple(logits_per_text.shape)}")
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels)
            + F.cross_entropy(logits_per_text.T, labels)) / 2
