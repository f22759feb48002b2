"""Chapter 1: the forward (noising) process of DDPM.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", corrupt a picture x_0 in T
small Gaussian steps q(x_t | x_{t-1}) = N(√(1−β_t)·x_{t−1}, β_t·I). Writing α_t = 1 − β_t
and ᾱ_t = ∏_{s≤t} α_s, any step can be reached in one jump (their eq. 4):

    q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I),   so   x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

Notation: DDIM (Song et al. 2021) writes α_t for what DDPM calls ᾱ_t. Here ᾱ_t is always
`alphas_cumprod[t]`, with t counted from 0 to T − 1 as diffusers does.

The schedule values match diffusers' `DDPMScheduler` for the same config (tested).
"""

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001,
               beta_end: float = 0.02, beta_schedule: str = "linear") -> torch.Tensor:
    """The noise variances β_t, t = 0 … T−1, as a float32 tensor of shape (T,).

    - `linear`: β evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, §4).
    - `scaled_linear`: √β evenly spaced, then squared. Stable Diffusion v1 uses it with
      β from 0.00085 to 0.012 over 1000 steps (the CompVis `ldm` configs).
    - `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal 2021 (eq. 17),
      ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with s = 0.008, β_t = 1 − ᾱ(t+1)/ᾱ(t) capped
      at 0.999; `beta_start`/`beta_end` are ignored.

    Raises ValueError for an unknown schedule name (listing the known ones), a number of
    steps that is not a positive integer, or β values outside 0 < beta_start ≤ beta_end < 1.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; "
                         f"choose one of {', '.join(BETA_SCHEDULES)}")
    whole = isinstance(num_train_timesteps, numbers.Integral) or (
        isinstance(num_train_timesteps, float) and num_train_timesteps.is_integer())
    if isinstance(num_train_timesteps, bool) or not whole or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    T = int(num_train_timesteps)
    if beta_schedule != "squaredcos_cap_v2" and not (
            isinstance(beta_start, numbers.Real) and isinstance(beta_end, numbers.Real)
            and 0 < beta_start <= beta_end < 1):
        raise ValueError(f"need 0 < beta_start ≤ beta_end < 1, got beta_start={beta_start!r}, "
                         f"beta_end={beta_end!r} (SD v1 uses 0.00085 and 0.012)")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that the last step is pure noise: ᾱ_{T−1} = 0, i.e. SNR = 0.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: shift √ᾱ so its last value is 0 and scale it so its first value is
    unchanged, then turn the new ᾱ back into β. Returns a new (T,) tensor; the input is
    not modified. With it the last β is 1, so samplers that divide by ᾱ (Euler's σ)
    must clamp it (see the schedulers). Raises ValueError for fewer than 2 steps.
    """
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs a 1-D schedule of at least 2 steps, "
                         f"got shape {tuple(betas.shape)}")
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac ** 2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


@dataclass
class NoiseSchedule:
    """The β/ᾱ schedule of the forward process, built from a diffusers-style config.

    The fields are the keys of diffusers' `scheduler_config.json`; `from_config` ignores the
    keys it does not use. Derived tensors, all float32 of shape (T,):

    - `betas` β_t, `alphas` α_t = 1 − β_t,
    - `alphas_cumprod` ᾱ_t = ∏_{s≤t} α_s, `alphas_cumprod_prev` ᾱ_{t−1} (with ᾱ_{−1} = 1),
    - `snr` the signal-to-noise ratio ᾱ_t / (1 − ᾱ_t).

    Example (SD v1): `NoiseSchedule(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear")` has ᾱ_0 = 0.99915 and ᾱ_999 ≈ 0.0046601.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        betas = make_betas(self.num_train_timesteps, self.beta_start, self.beta_end,
                           self.beta_schedule)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self._set_betas(betas)

    def _set_betas(self, betas: torch.Tensor):
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        """A schedule with the given β values (a sequence or a (T,) tensor, each in (0, 1]).
        Its `to_config()` describes the default schedule, not these betas. Raises ValueError
        for an empty, non-1-D or out-of-range sequence."""
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1], got "
                             f"shape {tuple(betas.shape)}")
        schedule = cls(num_train_timesteps=len(betas))
        schedule._set_betas(betas)
        return schedule

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers `scheduler_config.json` dict; unused keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_config(self) -> dict:
        return asdict(self)

    def check_timesteps(self, t, batch_size: int) -> torch.Tensor:
        """Validate timesteps and return them as an int64 tensor of shape (batch_size,).

        `t` is an int, a 0-d tensor (the same t for the whole batch) or a tensor of shape
        (B,) with integer values in [0, T−1]. Raises ValueError naming the problem.
        """
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype.is_complex:
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps must be whole numbers, got {t.flatten()[:8].tolist()}"
                                 "…; t indexes the training schedule (0 … T−1)")
        elif t.dtype == torch.bool:
            raise ValueError("timesteps must be integers, got a bool tensor")
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"timesteps must have shape ({batch_size},) to match the batch "
                             f"(or be a single number), got shape {tuple(t.shape)}")
        T = self.num_train_timesteps
        if t.numel() and (t.min() < 0 or t.max() > T - 1):
            bad = t[(t < 0) | (t > T - 1)]
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {bad[:8].tolist()}"
                             + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
        return t.long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (Ho et al. 2020, eq. 4).

        Args:
            x0: clean samples, shape (B, ...) e.g. (B, C, H, W), any float dtype and device.
            noise: ε, the same shape as x0 (usually standard normal).
            t: timesteps, an int or a (B,) integer tensor in [0, T−1].
        Returns:
            x_t, the shape, dtype and device of x0. ᾱ is cast to x0's dtype first, as
            diffusers does, so half-precision results match it.
        Raises:
            ValueError for mismatched shapes or devices, non-float inputs (e.g. uint8
            pictures) or bad timesteps.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} "
                             f"and {tuple(noise.shape)}")
        if x0.ndim == 0:
            raise ValueError("x0 needs a batch dimension: shape (B, ...)")
        if not (x0.is_floating_point() and noise.is_floating_point()):
            raise ValueError(f"x0 and noise must be float tensors, got {x0.dtype} and {noise.dtype}"
                             "; convert pictures first, e.g. x0 = pixels.float() / 127.5 - 1")
        if x0.device != noise.device:
            raise ValueError(f"x0 is on {x0.device} but noise is on {noise.device}; "
                             "put them on the same device")
        noise = noise.to(x0.dtype)
        t = self.check_timesteps(t, x0.shape[0]).to(x0.device)
        ac = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        ac = ac.reshape(-1, *([1] * (x0.ndim - 1)))
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise
