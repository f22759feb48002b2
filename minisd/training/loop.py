"""The one training loop of minisd, shared by the VAE, CLIP and U-Net recipes.

`train(model, loss_fn, data, config)` runs `config.steps` optimiser steps of

    batch → loss = loss_fn(model, batch) → backward → clip the gradient norm → AdamW step
          → EMA update → history, progress bar, checkpoint.

- AdamW (Loshchilov & Hutter 2019) with weight decay on weight matrices and convolution
  kernels only, not on biases and normalisation gains (as nanoGPT's `configure_optimizers`).
- Learning rate (`lr_at`): linear warm-up, then cosine decay to `min_lr` (SGDR, Loshchilov &
  Hutter 2017, eq. 5, one cycle) or constant.
- Gradient-norm clipping (Pascanu et al. 2013); the norm before clipping is recorded.
- An optional exponential moving average of the weights, with a decay warm-up that suits
  short runs (`minisd.training.ema`).
- A tqdm progress bar; with `progress=False` nothing is written to stdout or stderr.
  The per-step history (loss and the other terms `loss_fn` returns, lr, gradient norm) is
  returned for loss plots.
- Checkpoints `out_dir/checkpoint-<steps taken>/`: `model.safetensors` and `ema.safetensors`
  (weights) and `state.pt` (optimiser state, step, random-number states, history; read back
  with `torch.load(weights_only=True)`, so loading runs no code). `resume=True` continues
  from the latest one and ends with the same weights, bit for bit, as an uninterrupted run.
- The same command runs under `torchrun --nproc_per_node=N`: every process joins the process
  group (`init_distributed`: nccl on CUDA, gloo on CPU), the model is wrapped in
  DistributedDataParallel, and only rank 0 shows progress and writes checkpoints.

Data is a map-style `torch.utils.data.Dataset`. Each epoch is a permutation of it drawn
from (seed, epoch) by a `DistributedSampler`, cut into batches of `batch_size`, the *global*
batch: each of N processes takes batch_size/N samples of every batch, and DDP averages
their gradients, so N processes take the same steps as one process (up to float rounding).
Because the order depends only on (seed, epoch), a resumed run picks up at the right batch.
`loss_fn` draws its own randomness (noise, timesteps) from torch's global generator, seeded
with seed + rank and saved in checkpoints; randomness inside the dataset should depend on
the index only (or use num_workers=0) for resume to stay exact.

The recipes (`minisd.training.vae`, `.clip`, `.unet`) extend `TrainConfig` with their own
settings and defaults; `python -m minisd.training` (`minisd.training.__main__`) is their
command line.
"""

import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from minisd.training.ema import EMA

SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run of the loop. The recipes subclass it, adding
    their own fields and redeclaring some of these with their own defaults; every field is
    a command-line option (`python -m minisd.training`), its help in the field's metadata.

    Raises ValueError naming the field for a value out of range or an unknown schedule.
    """

    steps: int = field(default=1000, metadata={"help": "optimiser steps of the whole run"})
    batch_size: int = field(default=64, metadata={
        "help": "global batch size, split evenly over the processes"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the cosine"})
    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay, on weight matrices and kernels only"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up"})
    schedule: str = field(default="cosine", metadata={
        "help": "learning rate after the warm-up", "choices": SCHEDULES})
    grad_clip: float | None = field(default=1.0, metadata={
        "help": "clip the gradient norm to this ('none': no clipping)"})
    ema_decay: float | None = field(default=None, metadata={
        "help": "keep an EMA of the weights with this decay (its cap with --ema-warmup); "
                "'none': no EMA"})
    ema_warmup: bool = field(default=True, metadata={
        "help": "EMA decay min(ema_decay, (1+n)/(10+n)) at update n, for short runs"})
    out_dir: str | None = field(default=None, metadata={
        "help": "folder for checkpoints ('none': no checkpoints)"})
    checkpoint_every: int = field(default=500, metadata={
        "help": "write a checkpoint every this many steps, and at the end (0: at the end only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the latest checkpoint in out_dir, if there is one"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of torch's RNG"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    device: str | None = field(default=None, metadata={
        "help": "cpu, cuda, cuda:1, mps … ('none': CUDA when available, else CPU)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    log_every: int = field(default=10, metadata={
        "help": "show the mean loss of the last this many steps on the progress bar"})
    name: str = field(default="train", metadata={"help": "label of the progress bar"})

    def __post_init__(self):
        need = self._need
        need(self.steps >= 1, "steps", "at least 1")
        need(self.batch_size >= 1, "batch_size", "at least 1")
        need(self.lr > 0, "lr", "positive")
        need(0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]")
        need(self.weight_decay >= 0, "weight_decay", "non-negative")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             "two numbers in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", "non-negative")
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "positive or None")
        need(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) or None")
        need(self.checkpoint_every >= 0, "checkpoint_every", "non-negative")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
        need(self.num_workers >= 0, "num_workers", "non-negative")
        need(self.log_every >= 1, "log_every", "at least 1")
        need(not self.resume or self.out_dir is not None, "resume",
             "False when out_dir is None (there is nowhere to resume from)")

    def _need(self, ok: bool, name: str, what: str) -> None:
        """Raise ValueError "<class>.<name> must be <what>, got <value>" unless `ok`."""
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name} must be {what}, "
                             f"got {getattr(self, name)!r}")


# The fields that change the weights a run ends with; a resume warns when they differ.
_RESULT_FIELDS = ("batch_size", "lr", "min_lr", "weight_decay", "betas", "warmup_steps",
                  "schedule", "grad_clip", "ema_decay", "ema_warmup", "seed")


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step `step` (0-based: 0 … config.steps − 1).

    Warm-up, for step < W = warmup_steps: lr·(step + 1)/W, so the first step already moves
    and step W − 1 reaches lr. Then `constant`: lr; `cosine`:
    min_lr + ½·(lr − min_lr)·(1 + cos(π·p)) with p = (step − W)/(steps − W) in [0, 1)
    (SGDR, Loshchilov & Hutter 2017, eq. 5, one cycle; the last step's p < 1 keeps it > min_lr).
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    p = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank r of world_size processes (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_distributed(backend: str | None = None) -> Distributed:
    """Join torchrun's process group when launched by torchrun; a single process otherwise.

    torchrun gives every process RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
    With WORLD_SIZE > 1 this initialises the default process group once (`backend`, default
    nccl when CUDA is available, else gloo) and later calls reuse it; without these
    variables it returns rank 0 of 1 and initialises nothing. `close_distributed` ends it.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed() -> None:
    """Leave the process group if `init_distributed` joined one (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class TrainResult:
    """What `train` returns.

    model: the trained model (not the DDP wrapper), on the training device.
    ema_model: the EMA copy (eval mode, no gradients), or None without `ema_decay`.
    history: per step, lists of floats: 'step' (0-based), 'loss' and the other terms of
        `loss_fn` (averaged over the processes), 'lr', 'grad_norm' (before clipping).
    step: the steps taken in total; checkpoint: the last checkpoint written or resumed from.
    """

    model: nn.Module
    ema_model: nn.Module | None
    history: dict[str, list[float]]
    step: int
    checkpoint: Path | None


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DDP's forward sees every use of the model and
    loss_fn receives the plain model (with its own methods, e.g. `encode`)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def train(model: nn.Module, loss_fn: Callable, data: Dataset, config: TrainConfig,
          collate_fn: Callable | None = None) -> TrainResult:
    """Train `model` in place for `config.steps` steps; see the module docstring.

    Args:
        model: any `nn.Module`; moved to the training device; parameters with
            requires_grad=False (e.g. a frozen text encoder) are left alone.
        loss_fn: `loss_fn(model, batch)` → a scalar tensor, or a dict of scalars with a
            'loss' key (the other entries are recorded in the history). `batch` is this
            process's batch_size/N samples, collated and moved to the device.
        data: a map-style `Dataset` (e.g. `TensorDataset`) of at least one global batch.
        config: a `TrainConfig`.
        collate_fn: DataLoader's collate function (default: torch's `default_collate`).

    Raises TypeError for data that is not a map-style Dataset or a loss_fn output that is
    not a scalar or a dict with 'loss'; ValueError for a dataset smaller than one batch, a
    batch not divisible by the number of processes, a model without trainable parameters, or
    a checkpoint that does not fit the model; FileExistsError when out_dir holds checkpoints
    and resume is False; FloatingPointError, before the update, on a non-finite loss.
    """
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(f"data must be a map-style torch Dataset with a length (e.g. "
                        f"TensorDataset), got {type(data).__name__}")
    device = _pick_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    world = init_distributed("nccl" if device.type == "cuda" else "gloo")
    if config.batch_size % world.world_size:
        raise ValueError(f"batch_size {config.batch_size} does not split over "
                         f"{world.world_size} processes; use a multiple of {world.world_size}")
    local_batch = config.batch_size // world.world_size
    sampler = DistributedSampler(data, num_replicas=world.world_size, rank=world.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    if len(sampler) < local_batch:
        raise ValueError(f"the dataset has {len(data)} samples, fewer than one batch of "
                         f"{config.batch_size}; lower batch_size or add data")
    checkpoint = _checkpoint_to_resume(config)

    model.to(device).train()
    optimizer = _adamw(model, config)
    step_module = _LossModule(model, loss_fn)
    if world.world_size > 1:  # broadcasts rank 0's weights to every process
        step_module = DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None if config.ema_decay is None else EMA(model, config.ema_decay, config.ema_warmup)

    start, history = 0, {}
    if checkpoint is not None:
        start, history = _load_checkpoint(checkpoint, model, optimizer, ema, config, world)
    else:
        torch.manual_seed(config.seed + world.rank)

    loader = iter(DataLoader(data, batch_sampler=_index_batches(sampler, local_batch, start),
                             num_workers=config.num_workers, collate_fn=collate_fn,
                             generator=torch.Generator().manual_seed(config.seed)))
    params = [p for p in model.parameters() if p.requires_grad]
    with tqdm(total=config.steps, initial=start, desc=config.name, unit="step",
              disable=not (config.progress and world.rank == 0)) as bar:
        for step in range(start, config.steps):
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = _loss_terms(step_module(_to_device(next(loader), device)))
            values = _mean_over_processes(terms, world)
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"the loss is {values['loss']} at step {step}; lower lr, "
                                         f"set grad_clip, or check loss_fn")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip is None:
                grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            else:
                grad_norm = nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)

            for key, value in {"step": step, **values, "lr": lr,
                               "grad_norm": grad_norm.item()}.items():
                history.setdefault(key, []).append(value)
            bar.update(1)
            if (step + 1) % config.log_every == 0:
                recent = history["loss"][-config.log_every:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}", lr=f"{lr:.3g}")
            if config.out_dir is not None and (
                    step + 1 == config.steps
                    or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
                checkpoint = _save_checkpoint(step + 1, model, optimizer, ema, history, config,
                                              world)
    return TrainResult(model, None if ema is None else ema.model, history,
                       max(start, config.steps), checkpoint)


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device (a bare 'cuda' becomes this process's GPU), else CUDA or CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with ≥ 2 dimensions (matrices, kernels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                             betas=tuple(config.betas))


def _index_batches(sampler: DistributedSampler, local_batch: int, start_step: int):
    """This process's share of every global batch as index lists, from `start_step` on,
    epoch after epoch; an incomplete last batch of an epoch is dropped."""
    per_epoch = len(sampler) // local_batch
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        for b in range(skip, per_epoch):
            yield indices[b * local_batch:(b + 1) * local_batch]
        epoch, skip = epoch + 1, 0


def _to_device(batch, device: torch.device):
    """Move every tensor in nested tuples/lists/dicts to `device`; anything else stays."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss_terms(output) -> dict[str, torch.Tensor]:
    """loss_fn's output as {'loss': scalar, other terms…}."""
    terms = {"loss": output} if isinstance(output, torch.Tensor) else output
    if not isinstance(terms, dict) or "loss" not in terms:
        raise TypeError(f"loss_fn must return a scalar tensor or a dict with a 'loss' key, "
                        f"got {type(output).__name__}")
    if not isinstance(terms["loss"], torch.Tensor) or terms["loss"].ndim != 0:
        raise TypeError("loss_fn's loss must be a scalar (0-dimensional) tensor; "
                        "reduce it with .mean()")
    return terms


def _mean_over_processes(terms: dict, world: Distributed) -> dict[str, float]:
    """Each term as a float, averaged over the processes."""
    values = torch.tensor([v.detach().item() if torch.is_tensor(v) else float(v)
                           for v in terms.values()], dtype=torch.float64)
    if world.world_size > 1:
        values = values.to(terms["loss"].device)
        dist.all_reduce(values)
        values = values / world.world_size
    return dict(zip(terms, values.tolist()))


_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def _checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `out_dir`, oldest first."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The folder of the last checkpoint in `out_dir` (`checkpoint-<steps>`), or None."""
    found = _checkpoints(out_dir)
    return found[-1] if found else None


def _checkpoint_to_resume(config: TrainConfig) -> Path | None:
    if config.out_dir is None:
        return None
    latest = latest_checkpoint(config.out_dir)
    if latest is not None and not config.resume:
        raise FileExistsError(f"{config.out_dir} already holds checkpoints (latest {latest.name}); "
                              f"pass resume=True (--resume) to continue, or choose a new out_dir")
    return latest


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(step: int, model: nn.Module, optimizer, ema: EMA | None, history: dict,
                     config: TrainConfig, world: Distributed) -> Path:
    """Write `checkpoint-<step>` on rank 0 (every process sends it its RNG state)."""
    rng = [_rng_state()]
    if world.world_size > 1:
        rng = [None] * world.world_size
        dist.all_gather_object(rng, _rng_state())
    final = Path(config.out_dir) / f"checkpoint-{step:07d}"
    if world.rank == 0:
        _write_checkpoint(final, step, model, optimizer, ema, history, config, rng)
    if world.world_size > 1:
        dist.barrier()  # complete before any process goes on (e.g. to resume from it)
    return final


def _write_checkpoint(final: Path, step: int, model: nn.Module, optimizer, ema: EMA | None,
                      history: dict, config: TrainConfig, rng: list) -> None:
    partial = final.with_name(final.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(model, str(partial / "model.safetensors"))
    if ema is not None:
        save_model(ema.model, str(partial / "ema.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": history,
                "ema_num_updates": None if ema is None else ema.num_updates, "rng": rng,
                "config": {k: getattr(config, k) for k in _RESULT_FIELDS}},
               partial / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in _checkpoints(config.out_dir)[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def _load_checkpoint(folder: Path, model: nn.Module, optimizer, ema: EMA | None,
                     config: TrainConfig, world: Distributed) -> tuple[int, dict]:
    """Restore weights, optimiser, EMA and RNG states; return (step, history)."""
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    try:
        load_model(model, str(folder / "model.safetensors"), device=str(_device_of(model)))
        if ema is not None:
            if state["ema_num_updates"] is None:
                raise RuntimeError("it holds no EMA weights (it was trained with ema_decay=None)")
            load_model(ema.model, str(folder / "ema.safetensors"),
                       device=str(_device_of(model)))
            ema.num_updates = state["ema_num_updates"]
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {folder} does not fit this model and config: {e}. "
                         f"Resume with the model it was trained with, or choose a new "
                         f"out_dir") from e
    changed = [k for k in _RESULT_FIELDS if state["config"].get(k) != getattr(config, k)]
    if changed:
        warnings.warn(f"resuming {folder} with changed {', '.join(changed)}: the run will "
                      f"differ from an uninterrupted one", stacklevel=3)
    if len(state["rng"]) == world.world_size:
        rng = state["rng"][world.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        warnings.warn(f"{folder} was written by {len(state['rng'])} processes, not "
                      f"{world.world_size}: the random numbers start afresh", stacklevel=3)
        torch.manual_seed(config.seed + world.rank + state["step"])
    return state["step"], state["history"]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
