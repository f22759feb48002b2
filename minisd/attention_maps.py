"""Per-token cross-attention maps: where in the picture does the U-Net read each word?

In every cross-attention layer the pixels are the queries and the prompt's tokens the keys
(chapter 4), so the probabilities P = softmax(Q·Kᵀ/√d) (B, heads, h·w, 77) say, for each
pixel, how much it reads from each token. Column j of P, reshaped to h×w, is the map of
token j. Averaged over heads, over layers (each upsampled to the picture first) and over
denoising steps, it shows where a word lands: the map of "red" sits on the red object
(Hertz et al. 2022, "Prompt-to-Prompt", §3.1 and Fig. 4, which average the 16×16 maps of
SD over steps the same way).

`cross_attention_maps(pipe, prompt)` runs the pipeline's denoising generator once inside
`minisd.attention.record_attention` and returns a `CrossAttentionMaps`: the picture, its
tokens and one map per (step, token). Only the conditional half of the guided batch is
kept (the unconditional pass reads the empty prompt). Layers are chosen by module name.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisd.attention import record_attention
from minisd.shapes.evaluate import read


@dataclass
class CrossAttentionMaps:
    """What `cross_attention_maps` returns.

    tokens: the prompt's tokens as text, from the start token to the end-of-text token
        (L of them), e.g. ['<|startoftext|>', 'a', 'red', 'circle', '<|endoftext|>'].
    maps: float32 (S, L, H, W): for each of the S denoising steps and each token, the
        attention of every picture pixel to it, averaged over heads and the chosen layers
        (each bilinearly upsampled to the picture's H×W). Each pixel's values over all 77
        tokens sum to 1; over the L kept ones, to at most 1.
    timesteps: (S,) the timestep of each step.
    image: float32 (3, H, W) in [−1, 1], the generated picture.
    layers: the names of the attention modules averaged.
    """

    tokens: list[str]
    maps: torch.Tensor
    timesteps: torch.Tensor
    image: torch.Tensor
    layers: list[str]

    def token_index(self, token: int | str) -> int:
        """The position of `token`: an int index, or a word (its first occurrence).
        Raises ValueError for a word not in the prompt, IndexError for a bad index."""
        if isinstance(token, int):
            if not -len(self.tokens) <= token < len(self.tokens):
                raise IndexError(f"token index {token} out of range for {len(self.tokens)} "
                                 "tokens")
            return token % len(self.tokens)
        words = [t.strip() for t in self.tokens]
        if token not in words:
            raise ValueError(f"{token!r} is not a token of the prompt; tokens: {self.tokens}")
        return words.index(token)

    def token_map(self, token: int | str, steps=None) -> torch.Tensor:
        """The map (H, W) of one token, averaged over `steps` (None: all; an int, a slice or
        a list of step indices)."""
        chosen = self.maps[:, self.token_index(token)]
        if steps is not None:
            chosen = chosen[steps]
        return chosen if chosen.ndim == 2 else chosen.mean(dim=0)

    def peak(self, token: int | str, steps=None) -> tuple[float, float]:
        """(x, y) in pixels (pixel centres at 0.5, 1.5, …) of the maximum of `token_map`."""
        m = self.token_map(token, steps)
        row, col = divmod(int(m.argmax()), m.shape[1])
        return col + 0.5, row + 0.5


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the U-Net's attention modules that read the text (`attn2`, and `attn1` at
    levels with only_cross_attention), in module order."""
    return [name for name, module in unet.named_modules()
            if getattr(module, "is_cross_attention", False)]


def _layer_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` = h·w pixel tokens: the latent size halved (rounding
    up, as the U-Net's strided convs do) until it matches."""
    h, w = latent_hw
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} pixel tokens fit no level of a {latent_hw} latent")
    return h, w


@torch.no_grad()
def cross_attention_maps(pipe, prompt: str, num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, seed: int = 0, scheduler=None,
                         keep: Callable[[str], bool] | None = None) -> CrossAttentionMaps:
    """Generate one picture for `prompt` and record its per-token cross-attention maps.

    Args:
        pipe: a `minisd.pipeline.StableDiffusionPipeline`.
        prompt: one prompt (a string).
        num_inference_steps, guidance_scale, seed, scheduler: as for the pipeline (None:
            the model's own sampling defaults).
        keep: which cross-attention layers to average, a predicate on module names (e.g.
            `lambda n: n.startswith("down_blocks.1")`); None: all of them.
    Returns:
        `CrossAttentionMaps` with maps (steps, tokens, H, W) at the picture's size.
    Raises:
        TypeError for a prompt that is not a string; ValueError when `keep` leaves no layer.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
    layers = [n for n in cross_attention_layers(pipe.unet) if keep is None or keep(n)]
    if not layers:
        raise ValueError(f"no cross-attention layer is kept; the U-Net's are: "
                         f"{', '.join(cross_attention_layers(pipe.unet))}")
    ids = pipe.tokenizer([prompt])[0]
    length = int((ids == pipe.tokenizer.eos_token_id).int().argmax()) + 1
    tokens = [pipe.tokenizer.decode([i], skip_special_tokens=False) for i in ids[:length].tolist()]

    maps, timesteps, latents = [], [], None
    with record_attention(pipe.unet, keep=set(layers).__contains__) as recorder:
        for state in pipe.denoising_steps(prompt, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, seed=seed,
                                          scheduler=scheduler, progress=False):
            latent_hw = tuple(state.latents.shape[-2:])
            size = tuple(s * pipe.vae_scale_factor for s in latent_hw)
            step = torch.zeros(length, *size)
            for _, probs in recorder.maps:              # (B, heads, h·w, 77) per layer call
                conditional = probs[-1].mean(dim=0)[:, :length]   # (h·w, L), the prompt's half
                h, w = _layer_grid(conditional.shape[0], latent_hw)
                grid = conditional.T.reshape(1, length, h, w)
                step += F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]
            maps.append(step / len(recorder.maps))
            timesteps.append(float(state.timestep))
            recorder.maps.clear()
            latents = state.latents
    image = pipe.decode(latents, output_type="pt")[0].float().cpu() * 2 - 1
    return CrossAttentionMaps(tokens, torch.stack(maps), torch.tensor(timesteps), image, layers)


@dataclass
class PeakRate:
    """What `colour_peak_rate` returns: `hits` of `tried` colour words whose map peaked
    inside the drawn object of that colour; `rate` = hits / tried (nan when nothing was
    tried); `skipped`: colour words with no object of that colour in the picture."""

    hits: int
    tried: int
    skipped: int

    @property
    def rate(self) -> float:
        return self.hits / self.tried if self.tried else float("nan")


def colour_peak_rate(pipe, prompts, num_inference_steps: int = 10,
                     guidance_scale: float | None = None, seed: int = 0, margin: float = 1.0,
                     keep: Callable[[str], bool] | None = None) -> PeakRate:
    """How often the map of a colour word peaks inside the object of that colour.

    For prompt k (`minisd.shapes.world.Prompt`s, e.g. `evaluation_prompts`), one picture is drawn
    with seed `seed + k` (`cross_attention_maps`); the judge (`minisd.shapes.evaluate.read`) finds
    its objects. For every colour the prompt names, if the picture holds an object of that
    colour, the peak of the word's map (averaged over all steps) is a hit when it lies in
    that object's box, grown by `margin` pixels (guidance_scale None: the model's own);
    otherwise the word is skipped (the model
    did not draw it, so there is nothing to point at). This is the check of Hertz et al.
    2022 (Fig. 4) turned into a number.

    Raises ValueError for an empty prompt list.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("colour_peak_rate needs at least one prompt")
    hits = tried = skipped = 0
    for k, prompt in enumerate(prompts):
        maps = cross_attention_maps(pipe, prompt.caption, num_inference_steps, guidance_scale,
                                    seed + k, keep=keep)
        found = read(maps.image).objects
        for wanted in prompt.attributes.objects:
            drawn = [d for d in found if d.colour == wanted.colour]
            if not drawn or wanted.colour not in [t.strip() for t in maps.tokens]:
                skipped += 1
                continue
            x, y = maps.peak(wanted.colour)
            tried += 1
            hits += any(abs(x - d.x) <= d.width / 2 + margin and
                        abs(y - d.y) <= d.height / 2 + margin for d in drawn)
    return PeakRate(hits, tried, skipped)
