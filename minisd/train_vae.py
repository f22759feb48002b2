"""The recipe of the bundled VAE: a small AutoencoderKL trained on the shapes world.

`python -m minisd.train vae` trains it with the shared loop (`minisd.train.train`), then

1. sets `scaling_factor` = 1/σ̂, σ̂ the standard deviation of latents z ~ q(z | x) over
   pictures of the training set, so that the scaled latents the U-Net sees have unit
   variance (Rombach et al. 2022, §4.3.2 and appendix G; in CompVis' `ldm`,
   `scale_factor = 1 / z.flatten().std()` over the first batch);
2. writes the VAE in diffusers layout (`config.json` + `diffusion_pytorch_model.safetensors`,
   float16 by default: measured to cost less than 0.1 dB of PSNR, see the model card);
3. reads it back and measures, on test pictures, the reconstruction PSNR and whether the
   prompt-adherence judge (`minisd.evaluate`) reads the same attributes from each original
   and its reconstruction.

The model: three levels (16, 32, 64 channels), so the downsampling factor is f = 4 and a
64×64×3 picture becomes a 16×16×4 latent (12× fewer numbers, vs 48× for SD's f = 8 at
512×512). At f = 8 the latents would be 8×8: SD's own 64×64 latents are big enough for a
U-Net to draw detail at, 8×8 is not; 16×16 is what the U-Net's CPU budget affords
(`notes/calibration.md`). The loss is SD's first-stage objective without its LPIPS and GAN
terms: L1 reconstruction + β·KL with β = 1e-6 (`minisd.vae.vae_loss`).
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from minisd.data import ShapesDataset
from minisd.evaluate import ATTRIBUTES, score
from minisd.train import TrainConfig, init_distributed, register, train
from minisd.vae import AutoencoderKL, AutoencoderKLConfig, vae_loss

BUNDLED_FOLDER = Path(__file__).resolve().parent.parent / "data" / "minisd-shapes"
KL_WEIGHT = 1e-6  # β, as SD's VAE (see minisd.vae.vae_loss)


def bundled_vae_config(block_out_channels: tuple[int, ...] = (16, 32, 64),
                       norm_num_groups: int = 8) -> AutoencoderKLConfig:
    """The bundled VAE's configuration: 64×64×3 pictures → 16×16×4 latents (f = 4 with three
    levels), one ResNet block per level (two in the decoder), GroupNorm with 8 groups (the
    channels are too few for SD's 32). `scaling_factor` is a placeholder until training
    measures it. Other `block_out_channels` (each divisible by `norm_num_groups`) give other
    sizes: f = 2^(levels − 1)."""
    levels = len(block_out_channels)
    return AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * levels,
                               up_block_types=("UpDecoderBlock2D",) * levels,
                               block_out_channels=tuple(block_out_channels), layers_per_block=1,
                               latent_channels=4, norm_num_groups=norm_num_groups,
                               sample_size=64, scaling_factor=1.0)


def vae_loss_fn(kl_weight: float = KL_WEIGHT, reconstruction: str = "l1"):
    """The `loss_fn(model, batch)` for `minisd.train.train`: batch = (pictures (B, 3, H, W) in
    [−1, 1], captions, which are ignored); z is sampled from q(z | x) (the reparameterisation
    trick), decoded, and scored by `vae_loss`. Returns {"loss", "reconstruction", "kl"}."""
    def loss_fn(vae: AutoencoderKL, batch) -> dict[str, torch.Tensor]:
        images = batch[0]
        recon, posterior = vae(images, sample_posterior=True)
        terms = vae_loss(images, recon, posterior, kl_weight, reconstruction)
        return terms._asdict()
    return loss_fn


def _images(dataset: Dataset, batch_size: int):
    """The pictures of `dataset` ((image, caption) items) in order, in batches."""
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        yield images


@torch.no_grad()
def latent_std(vae: AutoencoderKL, dataset: Dataset, batch_size: int = 64,
               seed: int = 0) -> float:
    """σ̂: the standard deviation of all elements of z ~ q(z | x) (sampled, as the U-Net's
    training sees them; unscaled, without shift) over every picture of `dataset`. One
    pass, accumulated in float64. 1/σ̂ is the scaling factor (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    total = total_sq = count = 0.0
    for images in _images(dataset, batch_size):
        z = vae.encode(images.to(device)).sample(generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + (z ** 2).sum().item(), \
            count + z.numel()
    mean = total / count
    return math.sqrt((total_sq - count * mean ** 2) / (count - 1))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per picture, in dB: 10·log10(1 / MSE) on pictures mapped
    from [−1, 1] to [0, 1] (both clamped to that range first, as a viewer shows them).
    x, y: (B, C, H, W) → (B,); identical pictures give +inf."""
    a, b = ((t.float().clamp(-1, 1) + 1) / 2 for t in (x, y))
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def evaluate_reconstructions(vae: AutoencoderKL, num_samples: int = 500, split: str = "test",
                             seed: int = 0, batch_size: int = 50) -> dict:
    """Reconstruct the first `num_samples` pictures of the shapes world's `split` through the
    posterior mean (encode → mode → decode) and compare.

    The judge (`minisd.evaluate.score`) scores each original and its reconstruction against
    the sample's full attributes; a reconstruction "agrees" on an attribute when its verdict
    is the original's.
    Returns {"psnr": mean dB, "psnr_min": the worst picture's dB, "agreement": {attribute:
    share of pictures}, "judge_original" and "judge_reconstruction": {attribute: accuracy},
    "num_samples"}.
    """
    dataset = ShapesDataset(split, num_samples, seed)
    device = next(vae.parameters()).device
    values, verdicts = [], []
    for start, images in zip(range(0, num_samples, batch_size), _images(dataset, batch_size)):
        recon = vae.decode(vae.encode(images.to(device)).mode()).float().cpu()
        values.append(psnr(images, recon))
        for i, (original, rebuilt) in enumerate(zip(images, recon)):
            scene = dataset.attributes(start + i)
            verdicts.append((score(original, scene), score(rebuilt, scene)))
    values = torch.cat(values)

    def share(test) -> dict[str, float]:  # over the pictures where the attribute is scored
        scored = {a: [(o, r) for o, r in verdicts if a in o] for a in ATTRIBUTES}
        return {a: sum(test(o, r, a) for o, r in pairs) / len(pairs)
                for a, pairs in scored.items() if pairs}
    return {"psnr": values.mean().item(), "psnr_min": values.min().item(),
            "agreement": share(lambda o, r, a: o[a] == r[a]),
            "judge_original": share(lambda o, r, a: o[a]),
            "judge_reconstruction": share(lambda o, r, a: r[a]),
            "num_samples": num_samples}


def format_evaluation(results: dict) -> str:
    """`evaluate_reconstructions`' results as text: PSNR, then one row per attribute."""
    lines = [(f"reconstruction PSNR on {results['num_samples']} test pictures: "
              f"{results['psnr']:.2f} dB (worst picture {results['psnr_min']:.2f} dB)"),
             (f"{'attribute':<11}{'agreement':>11}{'judge: original':>17}"
              f"{'reconstruction':>16}")]
    for name, agree in results["agreement"].items():
        lines.append(f"{name:<11}{agree:>11.4f}{results['judge_original'][name]:>17.4f}"
                     f"{results['judge_reconstruction'][name]:>16.4f}")
    return "\n".join(lines)


@dataclass
class VAETrainResult:
    """What `train_vae` returns: the VAE (with its scaling factor; read back from the saved
    folder, float32, when one was written), the loop's per-step `history` (see
    `minisd.train.TrainResult`), and `evaluation` (`evaluate_reconstructions`' dict, or None)."""

    vae: AutoencoderKL
    history: dict[str, list[float]]
    evaluation: dict | None


def train_vae(config: TrainConfig, vae_config: AutoencoderKLConfig | None = None,
              output: str | Path | None = BUNDLED_FOLDER / "vae", kl_weight: float = KL_WEIGHT,
              reconstruction: str = "l1", train_samples: int = 100_000,
              scale_samples: int = 4096, eval_samples: int = 500,
              save_dtype: torch.dtype = torch.float16) -> VAETrainResult | None:
    """Train a VAE on the shapes world's train split, set its scaling factor, save and
    evaluate it (module docstring). Writes nothing to stdout (the command line prints).

    Args:
        config: the loop's settings (`DEFAULTS` for the bundled VAE).
        vae_config: the architecture (default `bundled_vae_config()`).
        output: the `vae/` folder to write, in `save_dtype`; None writes nothing (and
            evaluates the trained float32 weights).
        kl_weight, reconstruction: β and "l1" | "l2", see `minisd.vae.vae_loss`.
        train_samples: the size of the train split drawn from.
        scale_samples: the first this many training pictures estimate σ̂ (≤ train_samples).
        eval_samples: test pictures for `evaluate_reconstructions` (0: no evaluation).
        save_dtype: dtype of the saved weights.
    Returns:
        a VAETrainResult on rank 0; None on the other ranks of a torchrun run.
    Raises:
        ValueError for scale_samples out of [1, train_samples], and as `train` does.
    """
    if not 1 <= scale_samples <= train_samples:
        raise ValueError(f"scale_samples must be in [1, train_samples={train_samples}], "
                         f"got {scale_samples}")
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(vae_config or bundled_vae_config())
    dataset = ShapesDataset("train", train_samples, seed=0)
    result = train(vae, vae_loss_fn(kl_weight, reconstruction), dataset, config)
    if init_distributed().rank != 0:
        return None
    vae = (result.ema_model or result.model).eval()
    vae.config.scaling_factor = 1.0 / latent_std(vae, Subset(dataset, range(scale_samples)),
                                                 seed=config.seed)
    if output is not None:
        device = next(vae.parameters()).device
        vae.to(save_dtype).save_pretrained(output)
        vae = AutoencoderKL.from_pretrained(output).to(device).eval()
    evaluation = evaluate_reconstructions(vae, eval_samples) if eval_samples else None
    return VAETrainResult(vae, result.history, evaluation)


DEFAULTS = TrainConfig(steps=1500, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                       schedule="cosine", grad_clip=None, out_dir="runs/vae",
                       checkpoint_every=500, name="vae")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=str(BUNDLED_FOLDER / "vae"),
                        help="the vae/ folder to write ('none': do not save)")
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=[16, 32, 64],
                        help="channels per level; f = 2^(levels - 1)")
    parser.add_argument("--norm-num-groups", type=int, default=8,
                        help="GroupNorm groups (must divide every channel count)")
    parser.add_argument("--kl-weight", type=float, default=KL_WEIGHT, help="β of the KL term")
    parser.add_argument("--reconstruction", default="l1", choices=("l1", "l2"))
    parser.add_argument("--train-samples", type=int, default=100_000,
                        help="size of the shapes world's train split")
    parser.add_argument("--scale-samples", type=int, default=4096,
                        help="training pictures that estimate the latents' std")
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="test pictures for PSNR and judge agreement (0: skip)")
    parser.add_argument("--save-dtype", default="float16", choices=("float16", "float32"))


@register("vae", help="train the bundled VAE on the shapes world and write it to "
                      "data/minisd-shapes/vae (diffusers layout)",
          defaults=DEFAULTS, add_arguments=_add_arguments)
def _run(config: TrainConfig, args: argparse.Namespace) -> VAETrainResult | None:
    output = None if args.output.lower() == "none" else args.output
    result = train_vae(config, bundled_vae_config(tuple(args.block_out_channels),
                                                  args.norm_num_groups),
                       output=output, kl_weight=args.kl_weight,
                       reconstruction=args.reconstruction, train_samples=args.train_samples,
                       scale_samples=args.scale_samples, eval_samples=args.eval_samples,
                       save_dtype=getattr(torch, args.save_dtype))
    if result is not None:
        history, n = result.history, min(50, len(result.history["loss"]))
        params = sum(p.numel() for p in result.vae.parameters())
        print(f"vae: {params:,} parameters, {len(history['loss'])} steps; mean of the last {n}: "
              + ", ".join(f"{k} {sum(history[k][-n:]) / n:.4g}"
                          for k in ("loss", "reconstruction", "kl"))
              + f"; scaling_factor {result.vae.config.scaling_factor:.6g}")
        if output is not None:
            print(f"saved {output} ({args.save_dtype})")
        if result.evaluation is not None:
            print(format_evaluation(result.evaluation))
    return result
