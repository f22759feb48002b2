"""Pipeline speed: seconds per picture of the bundled model, per scheduler, against diffusers.

    python benchmarks/bench_pipeline.py [--tiny] [--model FOLDER] [--steps 25] [--runs 3]

minisd's StableDiffusionPipeline and diffusers' StableDiffusionPipeline read the same model
folder (data/minisd-shapes by default: 64×64 pictures). One call makes one picture from a
prompt: tokenise, encode the prompt and the empty negative prompt, `--steps` denoising steps
with classifier-free guidance (scale 7.5, one batched U-Net call per step), VAE decode, PIL
image; float32 on the CPU. Every scheduler of minisd is timed with diffusers' scheduler of
the same class and config; the pictures of the two are compared (relative error) first.
--tiny builds a tiny random model of SD v1's shape in a temporary folder instead.
Writes benchmarks/results/pipeline.json.
"""

import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path

import diffusers
import timing
import torch
import transformers

from minisd.package_data import bundled_model
from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import SCHEDULERS, from_name
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

PROMPT = "a red circle above a blue square"
GUIDANCE = 7.5
# SD v1's noise schedule (scheduler_config.json of the SD v1.x model folders)
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


def tiny_folder(folder: Path) -> Path:
    """A random model of SD v1's shape (U-Net and VAE with four levels, f = 8) at widths of
    8–16 channels, OpenAI's vocabulary: 64×64 pictures from 8×8 latents, saved to `folder`."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.openai()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2))
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=2))
    vae = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, sample_size=64))
    pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet,
                                   from_name("ddim", SD_SCHEDULE))
    return pipe.save_pretrained(folder)


def diffusers_scheduler(ours, folder: Path):
    """diffusers' scheduler of the same class as minisd's `ours`, from its saved config."""
    ours.save_pretrained(folder)
    return getattr(diffusers, type(ours).__name__).from_pretrained(folder)


def main(argv=None):
    p = timing.parser("pipeline", __doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a model folder")
    p.add_argument("--steps", type=int, help="denoising steps (default 25; 2 with --tiny)")
    args = timing.parse(p, argv)
    steps = args.steps or (2 if args.tiny else 25)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="minisd-bench-") as work:
        folder = tiny_folder(Path(work) / "tiny") if args.tiny else args.model or bundled_model()
        if not (folder / "model_index.json").is_file():
            p.exit(1, f"no model folder at {folder}; pass --model FOLDER (or --tiny)\n")
        results = benchmark(folder, steps, args, Path(work))
    size = results[0]["picture"]
    payload = {"benchmark": "pipeline", "reference": "diffusers.StableDiffusionPipeline",
               "model": "tiny random" if args.tiny else str(folder), "picture": size,
               "steps": steps, "guidance_scale": GUIDANCE, "pictures_per_call": 1,
               "dtype": "float32", "results": results, **timing.environment()}
    print(timing.table([timing.comparison_row(r["case"], r) for r in results],
                       timing.COMPARISON_COLUMNS))
    timing.write(args.out, payload)


def benchmark(folder: Path, steps: int, args, work: Path) -> list[dict]:
    """Time both pipelines on `folder`, every scheduler; one result dict per scheduler."""
    ours = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32,
                                                   device="cpu")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    size = ours.unet.config.sample_size * ours.vae_scale_factor
    shared = {"num_inference_steps": steps, "guidance_scale": GUIDANCE}

    results = []
    for name in SCHEDULERS:
        # the scheduler minisd's pipeline builds for scheduler=name, and diffusers' twin
        scheduler = from_name(name, {"clip_sample": False, **asdict(ours.scheduler.config)})
        reference.scheduler = diffusers_scheduler(scheduler, work / name)

        run_ours = partial(ours, PROMPT, seed=0, scheduler=name, progress=False, **shared)
        run_reference = partial(reference, PROMPT, **shared)
        seeded = {"generator": torch.Generator().manual_seed(0)}

        error = timing.relative_error(run_ours(output_type="pt").images,
                                      run_reference(output_type="pt", **seeded).images)
        result = timing.compare(run_ours, partial(run_reference, **seeded), args.runs,
                                args.warmup)
        results.append({"case": f"{name}, {steps} steps, {size}x{size}", "scheduler": name,
                        "picture": [size, size], "relative_error": error, **result})
        print(f"{name} done: {result['minisd']['median']:.3f} s per picture, ratio "
              f"{result['ratio']:.3f}, relative error {error:.1e}", flush=True)
    return results


if __name__ == "__main__":
    main()
