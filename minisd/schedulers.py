"""Chapter 5: the schedulers, which turn a noise predictor into a sampler.

A diffusion model is trained at T = 1000 noise levels (chapter 1). Sampling walks back along a
short grid of n of them, t_0 > t_1 > … > t_{n−1}, and every step does two things:

1. read the model output at t_i as a prediction of the clean sample x̂_0 (and of the noise ε̂).
   The model may predict ε (`epsilon`), x_0 itself (`sample`) or v = √ᾱ·ε − √(1−ᾱ)·x_0
   (`v_prediction`, Salimans & Ho 2022, §4);
2. move the sample to t_{i+1}, the *previous* timestep, always read from the grid (never
   computed as t − T//n, which is wrong on irregular grids).

The schedulers differ in step 2, and in how they write the noisy sample:

- variance preserving (DDPM, DDIM, DPM-Solver++): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, the form the
  U-Net was trained on, so `init_noise_sigma` is 1 and `scale_model_input` changes nothing;
- σ form (Euler, Euler ancestral; Karras et al. 2022): x = x_0 + σ·ε with σ_t = √((1−ᾱ_t)/ᾱ_t),
  i.e. x = x_t/√ᾱ_t. Sampling starts from x = σ_max·ε (`init_noise_sigma` ≈ 14.6 for SD v1),
  and the U-Net is shown x/√(σ² + 1), which is x_t again.

The grids (`timestep_spacing`, Lin et al. 2023, Table 2) are in `spaced_timesteps`.

Class names, config keys, defaults and the `step` output follow diffusers' schedulers of the
same names, and the tests compare timesteps, σ and whole trajectories with them. Where
diffusers leaves the grid (its DDIM steps to t − T//n; its trailing grid has n + 1 entries for
some n; its DPM-Solver grids repeat or reach t = T for n ≥ T), minisd keeps to the grid or
refuses, and says so where it happens.
"""

import functools
import json
import operator
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import ClassVar

import torch

from minisd.noise import NoiseSchedule, rescale_zero_terminal_snr
from minisd.pretrained import find_folder, naming, read_json

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
CONFIG_NAME = "scheduler_config.json"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def _whole_number(num_inference_steps) -> int:
    try:
        n = operator.index(num_inference_steps)
    except TypeError:
        raise ValueError("num_inference_steps must be a whole number, got "
                         f"{num_inference_steps!r}") from None
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {n}")
    return n


@functools.lru_cache(maxsize=64)
def max_grid_steps(num_train_timesteps: int = 1000, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> int:
    """The largest n such that `spaced_timesteps` gives every grid of 1 … n steps: n distinct
    timesteps inside [0, T−1].

    T for linspace and trailing spacing, and for leading spacing without offset; leading
    spacing with steps_offset k ≥ 1 ends at (n−1)·⌊T/n⌋ + k, which passes T − 1 for n = T:
    SD v1's leading grid (k = 1) gives at most 999 steps.
    """
    T = num_train_timesteps
    if timestep_spacing != "leading":
        return T
    n = 0
    while n < T and n * (T // (n + 1)) + steps_offset <= T - 1:    # the grid of n + 1 fits
        n += 1
    return n


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                     timestep_spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The n timesteps to sample on, from noisy to clean: a float64 tensor of shape (n,).

    With T training steps and k = 0 … n−1 (Lin et al. 2023, Table 2):

    - `leading`: k·⌊T/n⌋ + steps_offset, DDIM's grid; SD v1 configs use steps_offset = 1, so 50
      steps are 981, 961, …, 1;
    - `linspace`: k·(T−1)/(n−1), which can be fractional (Euler keeps the fractions, the other
      schedulers round them): 50 steps are 999, 978.6, …, 0;
    - `trailing`: round(T − k·T/n) − 1, which always starts at T − 1: 50 steps are 999, …, 19.

    diffusers computes the trailing grid with np.arange(T, 0, −T/n), which for some n (61, 103,
    …) returns n + 1 entries ending at −1; this grid always has n.

    Raises ValueError for an unknown spacing, n < 1, or n beyond `max_grid_steps` (n > T, or
    leading spacing with steps_offset = 1 and n = T, which would reach t = T).
    """
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    n = _whole_number(num_inference_steps)
    if n > T:
        raise ValueError(f"num_inference_steps={n} is more than the {T} timesteps the model "
                         f"was trained on; use at most {T}")
    k = torch.arange(n, dtype=torch.float64)
    if timestep_spacing == "leading":
        t = (k * (T // n) + steps_offset).flip(0)
    elif timestep_spacing == "linspace":
        t = k.clone()
        if n > 1:
            t = k * ((T - 1) / (n - 1))
            t[-1] = T - 1                     # exactly, as np.linspace ends
        t = t.flip(0)
    else:
        t = (T - k * (T / n)).round() - 1
    if t.min() < 0 or t.max() > T - 1:
        raise ValueError(f"{timestep_spacing} spacing with steps_offset={steps_offset} and {n} "
                         f"steps gives timesteps from {t.min():g} to {t.max():g}, outside the "
                         f"training range 0 … {T - 1}; use fewer steps, or steps_offset=0, or "
                         "timestep_spacing='trailing'")
    return t


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t): the noise level of x_t/√ᾱ_t = x_0 + σ_t·ε (Karras et al. 2022, §2).

    (T,) → (T,), in the dtype of the input. SD v1: σ_0 ≈ 0.02917, σ_999 ≈ 14.6146.
    """
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from σ_max down to σ_min, dense near σ_min (Karras et al. 2022, eq. 5).

    σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ with ρ = 7; float64 of shape (n,).
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _interp(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[t] for fractional t, linear between neighbours (like np.interp); float64."""
    table = table.double()
    lo = t.floor().long().clamp(0, len(table) - 2)
    w = t - lo
    return table[lo] + w * (table[lo + 1] - table[lo])


def _sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional t at which σ_t equals each σ: interpolation in log σ; float64."""
    log_table = train_sigmas.double().log()
    log_s = sigmas.double().clamp(min=1e-10).log()
    lo = (torch.searchsorted(log_table, log_s, right=True) - 1).clamp(0, len(log_table) - 2)
    w = (log_s - log_table[lo]) / (log_table[lo + 1] - log_table[lo])
    return lo + w.clamp(0, 1)


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn as diffusers draws it, so seeds carry over.

    `generator` is None, a torch.Generator, or a list of B generators (one per sample, each
    drawing a (1, …) slice). The noise is drawn on the generator's device and moved to `device`,
    so a CPU generator gives the same numbers on every device.
    Raises ValueError when a list of generators does not match the batch size shape[0].
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one generator, or one per sample")
        else:
            return torch.cat([randn_tensor((1, *shape[1:]), g, device, dtype) for g in generator])
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficients of shape (1,) or (B,) reshaped to (B, 1, …, 1) to broadcast over x (B, …).

    A reshape, not indexing, so it behaves the same on every device; moved to x's
    device in x's compute dtype (float32, or float64 for float64 x).
    """
    if values.numel() not in (1, x.shape[0]):
        raise ValueError(f"got {values.numel()} timesteps for a batch of {x.shape[0]}; "
                         "pass one timestep, or one per sample")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return values.to(device=x.device, dtype=dtype).reshape(-1, *([1] * (x.ndim - 1)))


def vp_predictions(model_output, sample, alpha_t, sigma_t, prediction_type):
    """x̂_0 and ε̂ from a model output, in the variance-preserving form x_t = α_t·x_0 + σ_t·ε,
    where α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t):

    - `epsilon`: x̂_0 = (x_t − σ_t·ε̂)/α_t, the closed form of chapter 1 solved for x_0;
    - `sample`: x̂_0 is the output, ε̂ = (x_t − α_t·x̂_0)/σ_t;
    - `v_prediction`: x̂_0 = α_t·x_t − σ_t·v and ε̂ = α_t·v + σ_t·x_t (Salimans & Ho 2022, §4).

    α_t, σ_t broadcast to the sample (e.g. (B, 1, 1, 1)); returns two tensors shaped like it.
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t * model_output) / sigma_t
    return alpha_t * sample - sigma_t * model_output, alpha_t * model_output + sigma_t * sample


def sigma_x0(model_output, sample, sigma, prediction_type):
    """x̂_0 from a model output in the σ form x = x_0 + σ·ε (the U-Net saw x/√(σ²+1)).

    - `epsilon`: x̂_0 = x − σ·ε̂;
    - `sample`: x̂_0 is the output;
    - `v_prediction`: x̂_0 = x/(σ²+1) − σ/√(σ²+1)·v (the v of Salimans & Ho 2022, §4, at
      x_t = x/√(σ²+1)).
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)


@dataclass
class SchedulerOutput:
    """What `step` returns; the fields of diffusers' scheduler outputs.

    prev_sample: the sample at the previous grid timestep, e.g. (B, 4, H/8, W/8), in the dtype
        of the input sample.
    pred_original_sample: x̂_0 predicted at this step, the same shape and dtype.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass
class SchedulerConfig:
    """Keys shared by every scheduler's `scheduler_config.json`, with diffusers' defaults.

    `trained_betas` (a list of T values) replaces the named beta schedule when given;
    `rescale_betas_zero_snr` applies Lin et al. 2023, Algorithm 1 (chapter 1) to the betas.
    Raises ValueError for an unknown prediction type or timestep spacing.

    A scheduler's config also remembers, as diffusers' does, what switching to another
    scheduler needs (see `Scheduler.from_config`): `use_default_values`, the keys that took
    their default because the source did not set them (diffusers' `_use_default_values`), and
    `other_keys`, the source's keys this scheduler does not read, kept for the next one.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.trained_betas is not None:
            self.trained_betas = [float(b) for b in self.trained_betas]
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values but "
                                 f"num_train_timesteps is {self.num_train_timesteps}; "
                                 "make them agree")


@dataclass
class DDPMSchedulerConfig(SchedulerConfig):
    """DDPM's keys: `clip_sample` clamps x̂_0 to ±`clip_sample_range` (for pixel models)."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0


@dataclass
class DDIMSchedulerConfig(DDPMSchedulerConfig):
    """DDIM's keys: `set_alpha_to_one` makes the step after the last grid point go to ᾱ = 1
    (a clean sample); False (SD v1 configs) goes to ᾱ_0 = 1 − β_0 instead."""

    set_alpha_to_one: bool = True


@dataclass
class EulerSchedulerConfig(SchedulerConfig):
    """The keys of the Euler schedulers: the shared ones, with linspace spacing by default."""

    timestep_spacing: str = "linspace"


@dataclass
class DPMSolverMultistepSchedulerConfig(SchedulerConfig):
    """DPM-Solver++'s keys: `solver_order` 1 or 2 (2M), `use_karras_sigmas` for the noise levels
    of Karras et al. 2022, eq. 5 instead of the spaced timesteps' own."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    use_karras_sigmas: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_choice("solver_order", self.solver_order, (1, 2))


class Scheduler:
    """What all schedulers share: the config, the noise schedule, the grid and its look-ups.

    Build one from keyword arguments (`DDIMScheduler(beta_schedule="scaled_linear")`), from a
    config (`from_config`: a model's scheduler_config.json, or another scheduler's `config`)
    or from a model folder (`from_pretrained`). Use: `set_timesteps(n, device)`, then for each t
    in `timesteps`: `model_input = scale_model_input(x, t)`, run the model,
    `x = step(out, t, x).prev_sample`. A scheduler holds the state of one run (its grid, and
    DPM-Solver's previous x̂_0): give each run its own (the pipeline copies it per call).
    """

    config_class = SchedulerConfig
    # diffusers config keys that minisd does not implement, with the values it accepts for them:
    # a config asking for anything else is refused rather than silently sampled differently.
    unsupported: ClassVar[dict] = {}
    init_noise_sigma = 1.0

    def __init__(self, **config):
        _check_supported(type(self), config)
        self.config = self.config_class(**config)
        self.config.use_default_values = sorted(set(_field_names(self.config_class))
                                                - set(config))
        self.config.other_keys = {}
        c = self.config
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float32)
            if c.rescale_betas_zero_snr:
                betas = rescale_zero_terminal_snr(betas)
            self.schedule = NoiseSchedule.from_betas(betas)
        else:
            self.schedule = NoiseSchedule.from_config(asdict(c))
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.timesteps = None
        self.num_inference_steps = None
        self.begin_index = 0

    @classmethod
    def from_config(cls, config, **overrides) -> "Scheduler":
        """Build from a config, with `overrides` (keyword arguments) on top.

        `config` is a dict (a model's scheduler_config.json, any scheduler's `to_config()`) or
        another scheduler's `config`. Switching follows diffusers exactly: every key the source
        set that this scheduler has is kept (num_train_timesteps, the β schedule and range,
        prediction_type, steps_offset, timestep_spacing, set_alpha_to_one, clip_sample,
        rescale_betas_zero_snr, …); a key the source did not set takes this scheduler's own
        default (SD v1's config sets no timestep_spacing: DDIM takes 'leading', Euler
        'linspace'), also after a detour through a scheduler that filled it in; keys this
        scheduler does not have are kept in `config.other_keys` for the next switch.
        Raises ValueError for a known key asking for a feature minisd lacks
        (e.g. thresholding=True).
        """
        config = {**_set_keys(config), **overrides}
        _check_supported(cls, config)
        names = _field_names(cls.config_class)
        scheduler = cls(**{k: v for k, v in config.items() if k in names})
        scheduler.config.other_keys = {k: v for k, v in config.items()
                                       if k not in names and not k.startswith("_")}
        return scheduler

    def to_config(self) -> dict:
        """The config as a diffusers-style dict: `_class_name`, the keys kept for other
        schedulers, this scheduler's keys, and `_use_default_values` (as diffusers' config)."""
        return {"_class_name": type(self).__name__, **self.config.other_keys,
                **asdict(self.config), "_use_default_values": list(self.config.use_default_values)}

    def save_pretrained(self, save_directory) -> Path:
        """Write `save_directory/scheduler_config.json` (without `_use_default_values`, as
        diffusers saves it); returns its path."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        path = path / CONFIG_NAME
        config = {k: v for k, v in self.to_config().items() if k != "_use_default_values"}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None):
        """Load from a model folder (its `scheduler/`), a folder holding `scheduler_config.json`
        (or `path/subfolder`), or that file itself: the same contract as the models'.
        Raises FileNotFoundError naming the missing file, ValueError naming the file and the
        key for a config that does not fit."""
        path = Path(path)
        config_path = (path if path.is_file() and subfolder is None
                       else find_folder(path, subfolder, "scheduler", (CONFIG_NAME,)) / CONFIG_NAME)
        with naming(config_path):
            return cls.from_config(read_json(config_path))

    # ---- the grid ----

    def _max_steps(self, timestep_spacing: str) -> int:
        """The most steps this scheduler's grid gives with `timestep_spacing`."""
        c = self.config
        return max_grid_steps(c.num_train_timesteps, timestep_spacing, c.steps_offset)

    @property
    def max_inference_steps(self) -> int:
        """The most steps `set_timesteps` accepts: every n from 1 to this gives n distinct
        timesteps in [0, T−1] (999 for SD v1's leading grid with steps_offset 1, else T)."""
        return self._max_steps(self.config.timestep_spacing)

    def spacings_allowing(self, num_inference_steps: int) -> list[str]:
        """The timestep spacings whose grid gives `num_inference_steps` steps with this
        scheduler's other settings."""
        return [s for s in TIMESTEP_SPACINGS if self._max_steps(s) >= num_inference_steps]

    def check_num_inference_steps(self, num_inference_steps) -> int:
        """Return n if the grid can give n steps; else raise ValueError naming the limit and
        the spacings that allow n (e.g. 1000 steps on SD v1's leading grid with steps_offset
        1: at most 999; trailing or linspace spacing give 1000)."""
        n = _whole_number(num_inference_steps)
        limit = self.max_inference_steps
        if n > limit:
            c = self.config
            allowing = self.spacings_allowing(n)
            grid = (f"{c.timestep_spacing} spacing with steps_offset={c.steps_offset}"
                    if c.timestep_spacing == "leading" else f"{c.timestep_spacing} spacing")
            advice = (f", or timestep_spacing={' or '.join(map(repr, allowing))}, which "
                      f"give{'s' if len(allowing) == 1 else ''} {n}" if allowing else "")
            raise ValueError(f"num_inference_steps={n} is more than {type(self).__name__}'s "
                             f"grid can give: {grid} on {c.num_train_timesteps} training "
                             f"timesteps gives at most {limit} distinct steps; use at most "
                             f"{limit}{advice}")
        return n

    def _set_grid(self, timesteps: torch.Tensor, device) -> None:
        self._grid = timesteps.cpu()
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = len(timesteps)
        self.begin_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Sample from grid position `begin_index` on (img2img runs only the end of the grid);
        call after set_timesteps. A timestep is looked up at or after this position, which
        matters where the grid repeats one (DPM-Solver with Karras σ on the cosine schedule).
        Raises ValueError before set_timesteps or for a position off the grid."""
        if self.timesteps is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) on the "
                             f"{type(self).__name__} before set_begin_index")
        if not 0 <= begin_index < len(self._grid):
            raise ValueError(f"begin_index must be a position of the {len(self._grid)}-step "
                             f"grid, 0 … {len(self._grid) - 1}; got {begin_index}")
        self.begin_index = begin_index

    def _index(self, timestep, start: int = 0) -> torch.Tensor:
        """Grid positions of a timestep (a number or 0-d tensor: shape (1,)) or of one per
        sample (a (B,) tensor: shape (B,)): the first position from `start` on that holds it.
        Raises ValueError before set_timesteps or for a t that is not on the grid."""
        if self.timesteps is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) on the "
                             f"{type(self).__name__} before using it")
        t = torch.as_tensor(timestep).detach().cpu()
        if t.ndim > 1:
            raise ValueError(f"timestep must be a number or a (B,) tensor, got shape "
                             f"{tuple(t.shape)}")
        t = t.reshape(-1)
        hits = t[:, None] == self._grid[None, :]
        hits[:, :start] = False
        missing = ~hits.any(dim=1)
        if missing.any():
            grid = self._grid.tolist()
            shown = grid if len(grid) <= 8 else grid[:4] + ["…"] + grid[-3:]
            raise ValueError(f"timestep {t[missing].tolist()} is not on the grid of "
                             f"set_timesteps({self.num_inference_steps}) ({shown}); pass the "
                             "values of scheduler.timesteps")
        return hits.int().argmax(dim=1)

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The grid timestep after `timestep` (−1 after the last one), as a (1,) or (B,) tensor."""
        i = self._index(timestep)
        return torch.cat([self._grid, self._grid.new_tensor([-1])])[i + 1]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The U-Net input at `timestep`: the sample itself for the variance-preserving
        schedulers. Raises ValueError before set_timesteps or for a t not on the grid."""
        self._index(timestep)
        return sample


def _field_names(config_class) -> set[str]:
    return {f.name for f in fields(config_class)}


def _set_keys(config) -> dict:
    """The keys a scheduler config's source set, as a dict: a dict without the keys its
    `_use_default_values` lists; a scheduler's config dataclass without its
    `use_default_values`, plus the `other_keys` it kept (diffusers' switching rule)."""
    if is_dataclass(config):
        defaults = set(getattr(config, "use_default_values", ()))
        own = {k: v for k, v in asdict(config).items() if k not in defaults}
        return {**getattr(config, "other_keys", {}), **own}
    defaults = set(config.get("_use_default_values", ()))
    return {k: v for k, v in config.items() if k not in defaults and k != "_use_default_values"}


def _check_supported(cls, config: dict) -> None:
    for key, accepted in cls.unsupported.items():
        if key in config and config[key] not in accepted:
            raise ValueError(f"{key}={config[key]!r} is not implemented by minisd's "
                             f"{cls.__name__}; it accepts {key} in {list(accepted)}")


class _AlphaScheduler(Scheduler):
    """DDPM and DDIM: integer grids, ᾱ at each grid point and at the point after it."""

    final_alpha_cumprod = 1.0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Make the grid: `timesteps` (n,) int64 on `device`, by `config.timestep_spacing`.

        Raises ValueError for n < 1 or n > `max_inference_steps`, naming the limit.
        """
        c = self.config
        n = self.check_num_inference_steps(num_inference_steps)
        t = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing,
                             c.steps_offset).round().long()
        final = torch.tensor([self.final_alpha_cumprod])
        self._alphas = torch.cat([self.alphas_cumprod[t], final])
        self._set_grid(t, device)

    def _alpha_pair(self, timestep):
        """ᾱ at t and at the previous grid point, each (1,) or (B,) float32 on the CPU."""
        i = self._index(timestep)
        alpha_t, alpha_prev = self._alphas[i], self._alphas[i + 1]
        if self.config.prediction_type == "epsilon" and (alpha_t == 0).any():
            raise ValueError("ε-prediction cannot give x̂_0 where ᾱ_t = 0 (t = T−1 with "
                             "rescale_betas_zero_snr); use a v_prediction model, or leading "
                             "spacing, which never reaches T−1")
        return i, alpha_t, alpha_prev

    def _x0_eps(self, model_output, x, alpha_t):
        x0, eps = vp_predictions(model_output.to(x.dtype), x, _per_sample(alpha_t ** 0.5, x),
                                 _per_sample((1 - alpha_t) ** 0.5, x), self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for any training timesteps (an int or a (B,) tensor in
        [0, T−1]); no grid needed (chapter 1's `NoiseSchedule.add_noise`)."""
        return self.schedule.add_noise(original_samples, noise, timesteps)


class DDPMScheduler(_AlphaScheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020), on any grid of timesteps.

    Each step samples the posterior q(x_{t'} | x_t, x̂_0) of the jump from t to the previous
    grid point t'. Stochastic: pass `generator` to `step` for reproducible noise.
    """

    config_class = DDPMSchedulerConfig
    unsupported: ClassVar[dict] = {"thresholding": (False,),
                                   "variance_type": ("fixed_small", None)}

    def posterior_variance(self, timestep) -> torch.Tensor:
        """β̃ = (1 − ᾱ_{t'})/(1 − ᾱ_t)·β with β = 1 − ᾱ_t/ᾱ_{t'} the β of the whole jump from t
        to the previous grid point t' (Ho et al. 2020, eq. 7), floored at 1e-20 as in diffusers.
        (1,) or (B,) float32. With 100 of 1000 steps, the jump 990 → 980 uses 1 − ᾱ_990/ᾱ_980,
        not β_990."""
        _, alpha_t, alpha_prev = self._alpha_pair(timestep)
        beta = 1 - alpha_t / alpha_prev
        return ((1 - alpha_prev) / (1 - alpha_t) * beta).clamp(min=1e-20)

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        """One DDPM step from t to the previous grid point t' (Ho et al. 2020, eqs. 6–7):

            x_{t'} = μ̃ + √β̃·z,  μ̃ = √ᾱ_{t'}·β/(1−ᾱ_t)·x̂_0 + √(1−β)·(1−ᾱ_{t'})/(1−ᾱ_t)·x_t,

        with β = 1 − ᾱ_t/ᾱ_{t'} and z ~ N(0, I) drawn (with `generator`) unless t = 0.

        Args:
            model_output: the model's prediction at t, shaped like `sample`.
            timestep: a grid value of `timesteps`, or a (B,) tensor of them, one per sample.
            sample: x_t, (B, C, H, W).
            generator: torch.Generator (or one per sample) for the noise z.
        Returns:
            SchedulerOutput(prev_sample = x_{t'}, pred_original_sample = x̂_0).
        Raises:
            ValueError before set_timesteps, or for a timestep not on the grid.
        """
        i, alpha_t, alpha_prev = self._alpha_pair(timestep)
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        x0, _ = self._x0_eps(model_output, x, alpha_t)
        alpha = alpha_t / alpha_prev
        beta = 1 - alpha
        mean = (_per_sample(alpha_prev ** 0.5 * beta / (1 - alpha_t), x) * x0
                + _per_sample(alpha ** 0.5 * (1 - alpha_prev) / (1 - alpha_t), x) * x)
        noisy = self._grid[i] > 0
        if noisy.any():
            z = randn_tensor(model_output.shape, generator, model_output.device,
                             model_output.dtype)
            std = torch.where(noisy, self.posterior_variance(timestep) ** 0.5, 0.0)
            mean = mean + _per_sample(std, x) * z
        return SchedulerOutput(mean.to(sample.dtype), x0.to(sample.dtype))


class DDIMScheduler(_AlphaScheduler):
    """DDIM (Song et al. 2021): deterministic (η = 0) steps along the same marginals as DDPM.

    The previous timestep comes from the grid. diffusers' DDIMScheduler instead steps to
    t − T//n, which leaves the grid for linspace spacing and for trailing spacing when n does
    not divide T (e.g. 999 → 899 instead of 888 with 10 linspace steps).
    """

    config_class = DDIMSchedulerConfig
    unsupported: ClassVar[dict] = {"thresholding": (False,)}

    @property
    def final_alpha_cumprod(self) -> float:
        """ᾱ after the last grid point: 1 with set_alpha_to_one, else ᾱ_0."""
        return 1.0 if self.config.set_alpha_to_one else self.alphas_cumprod[0].item()

    def step(self, model_output, timestep, sample, eta: float = 0.0,
             generator=None) -> SchedulerOutput:
        """One DDIM step from t to the previous grid point t' (Song et al. 2021, eq. 12):

            x_{t'} = √ᾱ_{t'}·x̂_0 + √(1 − ᾱ_{t'} − σ²)·ε̂ + σ·z,
            σ = η·√((1 − ᾱ_{t'})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t'})   (their eq. 16).

        (Song et al. write α for DDPM's ᾱ.) η = 0 is deterministic; η = 1 is DDPM's posterior.
        With clip_sample, x̂_0 is clamped and ε̂ is kept as predicted (as in diffusers).

        Args:
            model_output, timestep, sample, generator: as in DDPMScheduler.step.
            eta: η ≥ 0; noise z is drawn only when η > 0.
        Returns:
            SchedulerOutput(prev_sample = x_{t'}, pred_original_sample = x̂_0).
        Raises:
            ValueError before set_timesteps, or for a timestep not on the grid.
        """
        _, alpha_t, alpha_prev = self._alpha_pair(timestep)
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        x0, eps = self._x0_eps(model_output, x, alpha_t)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = eta * variance ** 0.5
        direction = (1 - alpha_prev - std ** 2).clamp(min=0) ** 0.5
        prev = _per_sample(alpha_prev ** 0.5, x) * x0 + _per_sample(direction, x) * eps
        if eta > 0:
            z = randn_tensor(model_output.shape, generator, model_output.device,
                             model_output.dtype)
            prev = prev + _per_sample(std, x) * z
        return SchedulerOutput(prev.to(sample.dtype), x0.to(sample.dtype))


class _SigmaScheduler(Scheduler):
    """Schedulers on noise levels σ: `sigmas` holds σ at each grid point plus a final 0."""

    config_class = EulerSchedulerConfig

    def __init__(self, **config):
        super().__init__(**config)
        alphas_cumprod = self.alphas_cumprod.clone()
        if self.config.rescale_betas_zero_snr:
            # ᾱ_{T−1} = 0 would make σ infinite; clamp it as diffusers does.
            alphas_cumprod[-1] = 2.0 ** -24
        self.train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        self.sigmas = None

    def _sigma_pair(self, timestep):
        i = self._index(timestep)
        return self.sigmas[i], self.sigmas[i + 1]


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022), k-diffusion style.

    The sample is x = x_0 + σ·ε; start from `init_noise_sigma`·ε and show the U-Net
    `scale_model_input(x, t)` = x/√(σ²+1).
    """

    unsupported: ClassVar[dict] = {
        "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "interpolation_type": ("linear",),
        "timestep_type": ("discrete",), "final_sigmas_type": ("zero",),
        "sigma_min": (None,), "sigma_max": (None,),
    }

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Make the grid: `timesteps` (n,) float32 on `device` (fractional with linspace) and
        `sigmas` (n+1,) float32 on the CPU, σ interpolated at each t, then a final 0.

        Raises ValueError for n < 1 or n > `max_inference_steps`, naming the limit.
        """
        c = self.config
        n = self.check_num_inference_steps(num_inference_steps)
        t = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing,
                             c.steps_offset).float()
        sigmas = _interp(t.double(), self.train_sigmas).float()
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._set_grid(t, device)

    @property
    def init_noise_sigma(self) -> float:
        """The std of the starting noise: σ_max (≈ 14.6146 for SD v1) for linspace and trailing
        grids, √(σ_max² + 1) for leading ones (diffusers' convention), with σ_max the largest σ
        of the grid (of all T steps before set_timesteps)."""
        sigmas = self.train_sigmas if self.sigmas is None else self.sigmas
        sigma_max = sigmas.max().item()
        if self.config.timestep_spacing == "leading":
            return (sigma_max ** 2 + 1) ** 0.5
        return sigma_max

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x/√(σ²+1): the U-Net's input x_t at the grid timestep t, which has std ≈ 1 for a
        correctly noised sample. timestep: a grid value, or (B,) of them."""
        sigma = self.sigmas[self._index(timestep)]
        return (sample / _per_sample((sigma ** 2 + 1) ** 0.5, sample)).to(sample.dtype)

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x = x_0 + σ_t·ε for grid timesteps (a number or a (B,) tensor), e.g. for img2img."""
        sigma = self.sigmas[self._index(timesteps)]
        return original_samples + _per_sample(sigma, original_samples).to(noise.dtype) * noise

    def _x0_and_slope(self, model_output, timestep, sample):
        sigma, sigma_next = self._sigma_pair(timestep)
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        s = _per_sample(sigma, x)
        x0 = sigma_x0(model_output.to(x.dtype), x, s, self.config.prediction_type)
        return x, x0, (x - x0) / s, sigma, sigma_next

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        """One Euler step from σ to the next grid σ' (Karras et al. 2022, Algorithm 2, lines
        7–8 with no churn, γ = 0, and no second-order correction):

            d = (x − x̂_0)/σ,   x' = x + (σ' − σ)·d.

        Args:
            model_output: the model's prediction at t, shaped like `sample`.
            timestep: a value of `timesteps`, or a (B,) tensor of them, one per sample.
            sample: x = x_0 + σ·ε, (B, C, H, W).
            generator: unused (the step is deterministic); accepted like the other schedulers.
        Returns:
            SchedulerOutput(prev_sample = x', pred_original_sample = x̂_0).
        Raises:
            ValueError before set_timesteps, or for a timestep not on the grid.
        """
        x, x0, d, sigma, sigma_next = self._x0_and_slope(model_output, timestep, sample)
        prev = x + _per_sample(sigma_next - sigma, x) * d
        return SchedulerOutput(prev.to(sample.dtype), x0.to(sample.dtype))


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Ancestral Euler: an Euler step to a lower σ_down, then fresh noise back up to σ'.

    The noise added, σ_up² = σ'²(σ² − σ'²)/σ², is DDPM's posterior variance (Ho et al. 2020,
    eq. 7) written in σ, and σ_down = √(σ'² − σ_up²); the split is k-diffusion's
    `get_ancestral_step` (Crowson 2022), which diffusers follows.
    """

    unsupported: ClassVar[dict] = {}

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        """One ancestral Euler step from σ to the next grid σ':

            d = (x − x̂_0)/σ,   x' = x + (σ_down − σ)·d + σ_up·z,   z ~ N(0, I),

        with z drawn at every step (also the last, where σ_up = 0), as diffusers draws it.
        Arguments, return value and errors as in EulerDiscreteScheduler.step; `generator`
        (or one per sample) makes z reproducible.
        """
        x, x0, d, sigma, sigma_next = self._x0_and_slope(model_output, timestep, sample)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        prev = x + _per_sample(sigma_down - sigma, x) * d
        z = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev = prev + _per_sample(sigma_up, x) * z
        return SchedulerOutput(prev.to(sample.dtype), x0.to(sample.dtype))


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver on x̂_0 predictions.

    Works in the variance-preserving form x_t = α_t·x_0 + σ_t·ε with α_t = 1/√(σ²+1) and
    σ_t = σ·α_t (σ the noise level of `sigmas`), and in log-SNR time λ = log(α_t/σ_t). Each
    step reuses x̂_0 of the previous one, so steps must be taken in grid order. The grid ends
    at σ = 0, reached by a first-order step; `orders` lists the order of each step
    (a first step taken mid-grid, as in img2img, is first order too).

    The linspace and leading grids take n + 1 points and drop t = 0 (as diffusers), so they
    allow one step fewer than `spaced_timesteps` (999, or 998 with leading spacing and
    steps_offset 1; diffusers repeats timesteps or reaches t = T there). With Karras σ the
    timesteps may repeat (many σ near σ_max round to t = T − 1 on the cosine schedule): each
    step still has its own σ, found by its position in the grid.
    """

    config_class = DPMSolverMultistepSchedulerConfig
    unsupported: ClassVar[dict] = {
        "thresholding": (False,), "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint",), "final_sigmas_type": ("zero",),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
        "lambda_min_clipped": (-float("inf"),), "variance_type": (None, "fixed_small"),
        "use_dynamic_shifting": (False,),
    }

    def _max_steps(self, timestep_spacing: str) -> int:
        c = self.config
        if c.use_karras_sigmas or timestep_spacing == "trailing":
            return c.num_train_timesteps
        return max_grid_steps(c.num_train_timesteps, timestep_spacing, c.steps_offset) - 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Make the grid: `timesteps` (n,) int64 on `device`, `sigmas` (n+1,) float32 on the CPU
        ending with 0, and `orders`, the solver order of each step.

        With use_karras_sigmas, σ follows Karras et al. 2022, eq. 5 from σ_max = σ_{T−1} to
        σ_min = σ_0, and each timestep is the rounded t where σ_t is that σ (it may repeat).
        Raises ValueError for n < 1 or n > `max_inference_steps`, naming the limit.
        """
        c = self.config
        T = c.num_train_timesteps
        n = self.check_num_inference_steps(num_inference_steps)
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(self.train_sigmas[0].item(), self.train_sigmas[-1].item(), n)
            t = _sigma_to_t(sigmas, self.train_sigmas).round()
        elif c.timestep_spacing == "trailing":
            t = spaced_timesteps(n, T, "trailing")
        else:
            t = spaced_timesteps(n + 1, T, c.timestep_spacing, c.steps_offset)[:-1].round()
        if not c.use_karras_sigmas:
            sigmas = _interp(t, self.train_sigmas)
        self.sigmas = torch.cat([sigmas.float(), torch.zeros(1)])
        self.orders = [1] + [c.solver_order] * (n - 2) + [1] if n > 1 else [1]
        self._previous_x0 = None
        self._next = 0
        self._set_grid(t.long(), device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at grid position `begin_index` (img2img): `add_noise` and the first `step`
        use the σ of that position, also where an earlier position holds the same timestep.
        Errors as in Scheduler.set_begin_index."""
        super().set_begin_index(begin_index)
        self._next = begin_index
        self._previous_x0 = None

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x_t = α_t·x_0 + σ_t·ε at grid timesteps (a number or a (B,) tensor), e.g. img2img;
        σ_t of the first position from `begin_index` on that holds t."""
        alpha, sigma = _alpha_sigma(self.sigmas[self._index(timesteps, self.begin_index)])
        return (_per_sample(alpha, original_samples) * original_samples
                + _per_sample(sigma, original_samples) * noise).to(original_samples.dtype)

    def _position(self, timestep) -> int:
        """The grid position of this step: the next position holding `timestep` (the grid may
        hold it several times). Raises ValueError for steps out of order or after the last."""
        self._index(timestep)                  # set_timesteps was called, t is on the grid
        t = torch.as_tensor(timestep).detach().cpu().reshape(-1).unique()
        if t.numel() != 1:
            raise ValueError(f"{type(self).__name__} steps the whole batch at one timestep; "
                             f"got {t.tolist()}")
        ahead = self._grid[self._next:] == t
        if not ahead.any() or (self._previous_x0 is not None and not ahead[0]):
            expected = (f"next is {self._grid[self._next].item()}" if self._next < len(self._grid)
                        else "all steps are done")
            raise ValueError(f"DPM-Solver is multistep: take the steps in the order of "
                             f"scheduler.timesteps ({expected}, got {t.item()}); call "
                             "set_timesteps again to start over")
        return self._index(t, self._next).item()

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        """One DPM-Solver++(2M) step from grid point i to i+1 (Lu et al. 2022, Algorithm 2):

            h = λ_{i+1} − λ_i,   r = (λ_i − λ_{i−1})/h,
            D = (1 + 1/(2r))·x̂_0(i) − 1/(2r)·x̂_0(i−1)        (second order),
            D = x̂_0(i)                                          (first order),
            x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h} − 1)·D.

        The first step, and the last (to σ = 0, where h = ∞ and r = 0), are first order.

        Args:
            model_output: the model's prediction at t, shaped like `sample`.
            timestep: the next value of `timesteps` (one for the whole batch).
            sample: x_t, (B, C, H, W).
            generator: unused (the solver is deterministic); accepted like the others.
        Returns:
            SchedulerOutput(prev_sample = x_{i+1}, pred_original_sample = x̂_0(i)).
        Raises:
            ValueError before set_timesteps, for a t not on the grid, or out of order.
        """
        i = self._position(timestep)
        alpha_i, sigma_i = _alpha_sigma(self.sigmas[i:i + 1])
        alpha_next, sigma_next = _alpha_sigma(self.sigmas[i + 1:i + 2])
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        x0, _ = vp_predictions(model_output.to(x.dtype), x, _per_sample(alpha_i, x),
                               _per_sample(sigma_i, x), self.config.prediction_type)
        lam_i, lam_next = _lambda(alpha_i, sigma_i), _lambda(alpha_next, sigma_next)
        h = lam_next - lam_i
        D = x0
        if self._previous_x0 is not None and self.orders[i] == 2:
            lam_prev = _lambda(*_alpha_sigma(self.sigmas[i - 1:i]))
            r = (lam_i - lam_prev) / h
            D = (_per_sample(1 + 1 / (2 * r), x) * x0
                 - _per_sample(1 / (2 * r), x) * self._previous_x0)
        prev = (_per_sample(sigma_next / sigma_i, x) * x
                - _per_sample(alpha_next * (torch.exp(-h) - 1), x) * D)
        self._previous_x0 = x0
        self._next = i + 1
        return SchedulerOutput(prev.to(sample.dtype), x0.to(sample.dtype))


def _alpha_sigma(sigma: torch.Tensor):
    """From the noise level σ to the VP pair: α_t = 1/√(σ²+1), σ_t = σ·α_t."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The half log-SNR λ = log α_t − log σ_t (+∞ at σ = 0)."""
    return torch.log(alpha) - torch.log(sigma)


# Stable Diffusion v1.x's scheduler/scheduler_config.json as published (runwayml/
# stable-diffusion-v1-5): the noise schedule every SD v1 model was trained with. minisd has no
# PNDMScheduler; `from_name` or any scheduler's `from_config` reads the keys it understands.
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def from_name(name: str, config=None, **overrides) -> Scheduler:
    """A scheduler by short name (the keys of SCHEDULERS: ddpm, ddim, euler, euler_ancestral,
    dpmpp_2m), built from a config (a model's scheduler_config.json dict, or any scheduler's
    config) with `overrides` on top, e.g. `from_name("dpmpp_2m", cfg, use_karras_sigmas=True)`;
    the switching rule of `Scheduler.from_config`.

    Raises ValueError for an unknown name, listing the known ones.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config({} if config is None else config, **overrides)


def scheduler_name(scheduler: Scheduler) -> str:
    """The short name of a scheduler's class (the key of SCHEDULERS), e.g. "ddim".
    Raises ValueError for a class that is not one of them."""
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    raise ValueError(f"{type(scheduler).__name__} has no short name; the named schedulers are "
                     f"{', '.join(SCHEDULERS)}")
