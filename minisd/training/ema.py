"""An exponential moving average (EMA) of a model's weights.

Diffusion models are sampled from an average of their recent weights rather than from the
last ones: the average smooths out the noise of the last optimisation steps (Ho et al. 2020,
Appendix B, decay 0.9999; Stable Diffusion's trainer keeps the same kind of copy).
After every optimiser step, each averaged weight θ̄ moves towards the current weight θ:

    θ̄ ← d·θ̄ + (1 − d)·θ,   with decay d in [0, 1).

The average spans about 1/(1 − d) steps: 1,000 for d = 0.999. A short run, of a few hundred
steps, then still holds mostly its random initial weights in the average. Hence the warm-up
(on by default): the decay actually used at the n-th update (n = 0, 1, …) is

    d_n = min(d, (1 + n) / (10 + n)),

the `num_updates` rule of TensorFlow's `tf.train.ExponentialMovingAverage`, also used by
diffusers' `EMAModel`. It starts at 0.1, so the average spans roughly the last tenth of the
steps taken so far, and reaches the cap d only after 9/(1 − d) − 10 updates (8,990 for
d = 0.999). With it, any cap is sensible for a short run.
"""

import copy

import torch
from torch import nn


class EMA:
    """An averaged copy of `model` (a frozen `nn.Module` in eval mode, on the same device).

    Args:
        model: the module being trained; it is deep-copied once, here.
        decay: the decay d, or its cap with `warmup`; a float in [0, 1).
        warmup: use d_n = min(d, (1 + n) / (10 + n)) at the n-th update (module docstring).

    `update(model)` moves every floating-point parameter of the copy towards `model`'s and
    copies the buffers (e.g. normalisation statistics) as they are; `num_updates` counts the
    updates (a checkpoint saves `model`'s weights and this count). Raises ValueError for a
    decay outside [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next `update` uses: d, or min(d, (1 + n)/(10 + n)) with warm-up."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ for every parameter; buffers are copied."""
        d = self.current_decay()
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach(), 1.0 - d)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)
        self.num_updates += 1
