"""CLIP's text encoder: 77 token ids become 77 context vectors for the U-Net.

Stable Diffusion v1 conditions its U-Net on the text tower of CLIP ViT-L/14 (Radford et al.
2021; Rombach et al. 2022, §3.3), a GPT-2-style transformer (Radford et al. 2019):

    x_0 = token_embedding[ids] + position_embedding[0..L−1]              (B, L, D)
    x_i = x_{i−1} + Attn(LN1(x_{i−1}));  x_i = x_i + MLP(LN2(x_i))     i = 1…N, (B, L, D)
    last_hidden_state = LN_final(x_N)                                    (B, L, D)
    pooler_output = last_hidden_state at the first end-of-text token     (B, D)

Pre-LayerNorm blocks; the attention is causal (token i sees tokens ≤ i), so a token's vector
does not depend on the padding after it; the MLP is D → 4D → D with quick_gelu,
x·σ(1.702·x) (OpenAI's approximation of GELU; OpenCLIP towers use exact "gelu").
SD v1: D = 768, N = 12 layers, 12 heads, L = 77, vocabulary 49,408: 123,060,480 parameters.
The U-Net reads `last_hidden_state` (every token's vector); CLIP's contrastive loss reads
`pooler_output`. With `clip_skip` = k the context is LN_final(x_{N−k+1}).

Parameter names are transformers' `CLIPTextModel` (`embeddings.token_embedding`,
`encoder.layers.{i}.self_attn.q_proj`, `…mlp.fc1`, `final_layer_norm`, …), so checkpoints
load with no renaming. Layouts: transformers 5 saves these keys as they are; SD v1.x
``text_encoder/`` folders (transformers 4) put them under ``text_model.`` and may carry a
``text_model.embeddings.position_ids`` buffer. `load_weights` and `load_state_dict` take both;
`save_pretrained` writes the ``text_model.`` layout of SD v1.x, which both load.
The tokenizer that makes the ids lives in minisd/tokenizer.py.
"""

import warnings
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import multi_head_attention
from minisd.pretrained import ModelConfig, PretrainedModel, check_positive
from minisd.state_dict import load_strict
from minisd.tokenizer import CLIPTokenizer

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "CLIPTokenizer"]

PREFIX = "text_model."


@dataclass
class CLIPTextConfig(ModelConfig):
    """The text tower's configuration; field names and defaults are transformers'
    `CLIPTextConfig` (its defaults are the ViT-B/32 text tower; `sd_v1()` gives ViT-L/14's).

    `hidden_act` is "quick_gelu" or "gelu"; `eos_token_id` marks where `pooler_output` is
    read. `projection_dim` (the width of CLIP's text projection), `pad_token_id` and
    `bos_token_id` are not used by this model; they describe the checkpoint and are kept.

    Raises TypeError naming a field of the wrong type; ValueError naming the field for sizes
    that are not > 0, a width the heads do not divide, an unknown `hidden_act` or an
    `eos_token_id` outside the vocabulary.
    """

    class_name = "CLIPTextModel"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def check(self):
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "projection_dim",
                       "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                       "layer_norm_eps")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {sorted(ACTIVATIONS)}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id} is not an id of the "
                             f"{self.vocab_size}-token vocabulary (vocab_size)")

    @classmethod
    def sd_v1(cls) -> "CLIPTextConfig":
        """SD v1.x's text encoder, CLIP ViT-L/14's text tower (its text_encoder/config.json)."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_attention_heads=12)


class CLIPTextOutput(NamedTuple):
    """last_hidden_state (B, L, D): the U-Net's context; pooler_output (B, D): the vector at
    the first EOS; hidden_states: N + 1 tensors (B, L, D), the embeddings then each layer's
    output (before the final LayerNorm)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702·x), the GELU approximation of OpenAI's CLIP (Hendrycks & Gimpel 2016, §2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj,
    out_proj; all with bias), computed by `minisd.attention.multi_head_attention`.
    `record_attention` sees it through its `recorder`/`record_name` attributes.
    Shapes: (B, L, D) → (B, L, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.recorder, self.record_name = None, ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                   causal=True, recorder=self.recorder, name=self.record_name)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """fc1 (D → intermediate), activation, fc2 (→ D). Shapes: (B, L, D) → (B, L, D)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer block: two residual sub-blocks. (B, L, D) → (B, L, D)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(dim, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Learned token and absolute position embeddings, added. ids (B, L) → (B, L, D)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings,
                                               config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


def text_encoder_state(state_dict: dict[str, torch.Tensor],
                       source: str = "a state dict") -> dict[str, torch.Tensor]:
    """Text-encoder keys with or without ``text_model.`` → minisd's (without), dropping the
    ``embeddings.position_ids`` buffer: positions are always 0…L−1.

    Merged SD v1 files often store that buffer broken (as floats such as arange(77) − 1e-4,
    which cast to integers shift every token by one, or as other integers); it is ignored
    all the same, with a warning naming `source` when it is not 0…L−1.
    """
    state = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    ids = state.pop("embeddings.position_ids", None)
    if ids is not None and not torch.equal(ids.reshape(-1).double(),
                                           torch.arange(ids.numel(), dtype=torch.float64)):
        warnings.warn(f"{source}: the stored position_ids are not 0…{ids.numel() - 1} "
                      f"({ids.dtype}, starting {ids.reshape(-1)[:3].tolist()}), a known defect "
                      "of merged checkpoints; ignored: the positions are always 0…L−1",
                      stacklevel=3)
    return state


class CLIPTextModel(PretrainedModel, nn.Module):
    """CLIP's text transformer (module docstring); matches transformers' `CLIPTextModel`.

    Weights start as in OpenAI's CLIP (`initialize_parameters`): embeddings N(0, 0.02²) for
    tokens and N(0, 0.01²) for positions, attention and MLP projections N(0, σ²) with
    σ = D^−½ (q, k, v), D^−½·(2N)^−½ (out_proj, fc2), (2D)^−½ (fc1), biases 0.

    Files: `from_pretrained(path, subfolder=None, torch_dtype=None)` reads a ``text_encoder/``
    folder (config.json + model.safetensors, either key layout), `save_pretrained` writes one
    in the ``text_model.`` layout of SD v1.x (`minisd.pretrained`).
    """

    config_class = CLIPTextConfig
    part = "text_encoder"
    weights_names = ("model.safetensors", "pytorch_model.bin")
    weights_prefix = PREFIX
    file_config: ClassVar[dict] = {"architectures": ["CLIPTextModel"],
                                   "model_type": "clip_text_model"}

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        # a plain container so that the keys read encoder.layers.{i}, as in transformers
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))})
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Configs written before transformers PR #24773 (SD v1.x's among them) say
        # eos_token_id 2; in the 49,408-token CLIP vocabulary end-of-text is 49407.
        legacy = config.eos_token_id == 2 and config.vocab_size == 49408
        self.eos_token_id = 49407 if legacy else config.eos_token_id
        self._init_weights()

    def _init_weights(self):
        D, N = self.config.hidden_size, self.config.num_hidden_layers
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear, std in ((attn.q_proj, D ** -0.5), (attn.k_proj, D ** -0.5),
                                (attn.v_proj, D ** -0.5), (attn.out_proj, (2 * N * D) ** -0.5),
                                (mlp.fc1, (2 * D) ** -0.5), (mlp.fc2, (2 * N * D) ** -0.5)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def _check_inputs(self, input_ids, clip_skip):
        """The checks of `forward`: input_ids a non-empty integer tensor (B, L), at most
        max_position_embeddings long; clip_skip an int in 1…N. The ids' values (in the
        vocabulary, an end-of-text id in every row) are checked where that needs no device
        sync: on the CPU, where CLIPTokenizer makes them."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids (B, L), got "
                            f"{type(input_ids).__name__}; make them with CLIPTokenizer")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids (int64), got "
                            f"{input_ids.dtype}; make them with CLIPTokenizer, or convert "
                            "with ids.long() if the values are whole numbers")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}; "
                             "for one prompt use ids[None] (CLIPTokenizer returns (B, L))")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids is empty, shape {(B, L)}; give at least one prompt of "
                             "at least BOS and EOS (CLIPTokenizer makes them)")
        if L > cfg.max_position_embeddings:
            raise ValueError(f"{L} tokens, but the model has only {cfg.max_position_embeddings}"
                             " positions; tokenise with max_length="
                             f"{cfg.max_position_embeddings}")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
            raise TypeError(f"clip_skip must be an int from 1 (last layer) to "
                            f"{cfg.num_hidden_layers}, got {clip_skip!r} "
                            f"({type(clip_skip).__name__})")
        if not 1 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip}; use 1 (last layer) to "
                             f"{cfg.num_hidden_layers}")
        if input_ids.device.type != "cpu":
            return
        if ((input_ids < 0) | (input_ids >= cfg.vocab_size)).any():
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got "
                             f"{int(input_ids.min())}…{int(input_ids.max())}: use the "
                             "tokenizer that belongs to this text encoder")
        if not (input_ids == self.eos_token_id).any(dim=1).all():
            raise ValueError(f"a row of input_ids has no end-of-text id {self.eos_token_id}; "
                             "make the ids with CLIPTokenizer")

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> CLIPTextOutput:
        """Encode token ids.

        Args:
            input_ids: token ids (B, L), an integer tensor (int64 from `CLIPTokenizer`),
                B ≥ 1, 1 ≤ L ≤ max_position_embeddings (77); every row must contain the
                end-of-text id.
            clip_skip: which layer's output becomes `last_hidden_state`: 1 the last (the
                default, SD v1), 2 the penultimate, …, always passed through the final
                LayerNorm (the "clip skip" of A1111 and ComfyUI — diffusers'
                `clip_skip` counts one less). `pooler_output` always comes from the last layer.
        Returns:
            `CLIPTextOutput`: last_hidden_state (B, L, D), pooler_output (B, D),
            hidden_states (N + 1 tensors (B, L, D)); float, in the model's dtype.
        Raises:
            TypeError if input_ids is not an integer tensor (e.g. float ids) or clip_skip is
            not an int; ValueError if input_ids is not (B, L), is empty, L is too long, an id
            is outside the vocabulary, a row has no end-of-text id, or clip_skip is not in 1…N.
            The last two value checks run on CPU ids (no device sync per call); ids already
            on an accelerator are taken as a tokenizer made them.
        """
        self._check_inputs(input_ids, clip_skip)
        B = input_ids.shape[0]
        x = self.embeddings(input_ids.long())                           # (B, L, D)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)                                                # (B, L, D)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        first_eos = (input_ids == self.eos_token_id).int().argmax(dim=1)   # the first maximum
        pooled = last[torch.arange(B, device=last.device), first_eos]  # (B, D)
        if clip_skip > 1:
            last = self.final_layer_norm(hidden_states[-clip_skip])
        return CLIPTextOutput(last, pooled, tuple(hidden_states))

    # ---- weights ----

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "a state dict",
                     file_name=None, assign: bool = False) -> "CLIPTextModel":
        """Load weights with transformers' names, with or without the ``text_model.`` prefix;
        a ``(text_model.)embeddings.position_ids`` buffer is dropped (`text_encoder_state`).
        Returns self. Raises ValueError listing unexpected keys, missing keys and shape
        mismatches, by the names the state dict uses (`minisd.state_dict.load_strict`)."""
        self._load_strict(state_dict, source, file_name, assign)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` that also takes the ``text_model.`` layout and drops
        the position_ids buffer; when `strict`, errors as in `load_weights`."""
        if not strict:
            return super().load_state_dict(text_encoder_state(state_dict), strict=False,
                                           assign=assign)
        return self._load_strict(state_dict, "a CLIP text encoder state dict", None, assign)

    def _load_strict(self, state_dict, source, file_name, assign):
        original = {k.removeprefix(PREFIX): k for k in state_dict}   # our name → file's name
        hint = (f"Keys are transformers' CLIPTextModel names, optionally under '{PREFIX}'; a "
                "truncated file or another model's weights do not fit.")
        return load_strict(self, text_encoder_state(state_dict, source), source,
                           file_name or (lambda k: original.get(k, k)), hint=hint,
                           assign=assign)
