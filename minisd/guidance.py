"""Classifier-free guidance: push the prediction away from "no prompt", towards the prompt.

The U-Net is trained with the prompt sometimes dropped, so it can predict the noise both with
the prompt (ε_c) and without it (ε_u). Sampling then uses (Ho & Salimans 2022, eq. 6, with
their w = s − 1, the convention of Stable Diffusion):

    ε̂ = ε_u + s·(ε_c − ε_u).

s = 1 is the plain conditional model (one U-Net call per step suffices); s = 0 ignores the
prompt; SD v1 samples with s = 7.5. Large s over-saturates; `guidance_rescale` (Lin et al.
2023, §3.4) pulls the standard deviation of ε̂ back to that of ε_c.
"""

import torch


def needs_unconditional_pass(guidance_scale: float) -> bool:
    """Whether guidance needs ε_u, i.e. whether the U-Net must also run without the prompt.

    False only for s = 1, where ε̂ = ε_c exactly; s = 0 (ε̂ = ε_u) and 0 < s < 1 need it too.
    """
    return guidance_scale != 1


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                             scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """ε̂ = ε_u + s·(ε_c − ε_u), optionally rescaled (Ho & Salimans 2022, eq. 6; SD convention).

    Args:
        noise_uncond: ε_u, the prediction without the prompt, e.g. (B, 4, H/8, W/8).
        noise_text: ε_c, the prediction with the prompt, the same shape.
        scale: the guidance scale s. s = 1 returns ε_c exactly and s = 0 returns ε_u exactly
            (ε_u = 0, ε_c = 1, s = 7.5 gives 7.5 everywhere).
        guidance_rescale: φ in [0, 1] (Lin et al. 2023, §3.4): with σ the standard deviation
            over all but the batch dimension, ε̂ ← φ·ε̂·σ(ε_c)/σ(ε̂) + (1 − φ)·ε̂. The paper
            applies it to its v-predictions; diffusers, and this function, to the noise
            prediction.
    Returns:
        ε̂, the shape and dtype of the inputs.
    Raises:
        ValueError if the two shapes differ or guidance_rescale is outside [0, 1].
    """
    if noise_uncond.shape != noise_text.shape:
        raise ValueError(f"noise_uncond and noise_text must have the same shape, got "
                         f"{tuple(noise_uncond.shape)} and {tuple(noise_text.shape)}")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if scale == 1:
        guided = noise_text
    else:
        guided = noise_uncond + scale * (noise_text - noise_uncond)
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        rescaled = guided * (noise_text.std(dim=dims, keepdim=True)
                             / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided
