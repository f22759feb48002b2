"""minisd against diffusers on an NVIDIA GPU: SD v1 configuration, random weights, float16.

    python benchmarks/gpu.py [--compile] [--channels-last] [--steps 50] [--runs 5]
    python benchmarks/gpu.py --tiny     # tiny models; on the CPU where there is no GPU

Builds the SD v1 U-Net, VAE and CLIP text encoder of minisd with random weights and gives
diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel the same
tensors, then, in this one process, alternating minisd and the reference:

- U-Net iterations/s of one denoising step with guidance at 512×512: latents (2, 4, 64, 64),
  context (2, 77, 768);
- VAE decode seconds, (1, 4, 64, 64) → a 512×512 picture;
- text encoder seconds, (2, 77) token ids;
- a whole pipeline, seconds per 512×512 picture: minisd's StableDiffusionPipeline against
  diffusers' StableDiffusionPipeline built from the same components (the tokenizer from
  minisd's copy of OpenAI's vocabulary, saved to a temporary folder), DDIM with SD v1's
  noise schedule, `--steps` steps, guidance 7.5, the same starting latents.

Before any timing it checks that the two agree: the relative error ‖a − b‖ / ‖b‖ of the
U-Net, VAE and text encoder outputs and of the final pictures must be below --tolerance
(float16 differences seen on a CPU: ≤ 3.3e-3) and everything must be finite; otherwise it
stops, naming the part. --compile compiles the U-Nets and VAE decoders of both with
torch.compile (in the warm-up; it adds minutes); --channels-last stores their weights
channels-last.
It prints progress, writes benchmarks/results/gpu.json and prints a short table last.
The work, per implementation: 8 U-Net calls, 8 VAE decodes, 8 text encodings and 4
pipelines of 50 steps (208 U-Net calls of batch 2 at 512²), sized to stay under
5 minutes on a GPU that runs SD v1 at ≥ 2 it/s; the total time is printed and saved (not yet
measured by the authors: this script was written on a machine without a GPU).
Needs PyTorch with CUDA, diffusers, and the transformers that diffusers' pipeline uses.
"""

import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import diffusers
import timing
import torch
import transformers

from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import from_name
from minisd.text_encoder import CLIPTextConfig, CLIPTextModel
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionConfig, UNet2DConditionModel
from minisd.vae import AutoencoderKL, AutoencoderKLConfig

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
# SD v1's noise schedule (scheduler_config.json of the SD v1.x model folders)
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
TINY_UNET = UNet2DConditionConfig(sample_size=8, block_out_channels=(32, 32, 64, 64),
                                  norm_num_groups=8, cross_attention_dim=32,
                                  attention_head_dim=4)
TINY_VAE = AutoencoderKLConfig(block_out_channels=(16, 16, 32, 32),
                               down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
                               sample_size=64)
TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype, channels_last: bool):
    """minisd's three networks with random weights and the references sharing them.
    Returns {"unet": (ours, reference), "vae": (…), "text_encoder": (…)}, in eval mode."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    pairs = {}
    for name, ours_class, reference_class, config in (
            ("unet", UNet2DConditionModel, diffusers.UNet2DConditionModel,
             TINY_UNET if tiny else UNet2DConditionConfig()),
            ("vae", AutoencoderKL, diffusers.AutoencoderKL,
             TINY_VAE if tiny else AutoencoderKLConfig.sd_v1())):
        with torch.device(device):
            ours = ours_class(config)
        ours.to(dtype=dtype, memory_format=memory_format)
        kwargs = {k: v for k, v in config.to_config().items() if not k.startswith("_")}
        with torch.device("meta"):
            reference = reference_class(**kwargs)
        reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
        pairs[name] = ours.eval(), reference.eval()
    text_config = TINY_CLIP if tiny else CLIPTextConfig.sd_v1()
    with torch.device(device):  # transformers' model first: it has a buffer of positions
        reference = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**text_config.to_config())).to(dtype)
    with torch.device("meta"):
        ours = CLIPTextModel(text_config)
    ours.load_state_dict(reference.state_dict(), assign=True)
    pairs["text_encoder"] = ours.eval(), reference.eval()
    return pairs


def build_pipelines(pairs: dict, folder: Path):
    """minisd's and diffusers' StableDiffusionPipeline on the shared networks, with DDIM."""
    tokenizer = CLIPTokenizer.openai()
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = from_name("ddim", SD_SCHEDULE)
    scheduler.save_pretrained(folder / "scheduler")
    ours = StableDiffusionPipeline(pairs["vae"][0], pairs["text_encoder"][0], tokenizer,
                                   pairs["unet"][0], scheduler)
    reference = diffusers.StableDiffusionPipeline(
        vae=pairs["vae"][1], text_encoder=pairs["text_encoder"][1],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=pairs["unet"][1], scheduler=diffusers.DDIMScheduler.from_pretrained(
            folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return ours, reference


def check(name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    """The relative error of `ours` against `reference`; exits naming the part when either
    is not finite or the error is not below `tolerance`."""
    if not (torch.isfinite(ours).all() and torch.isfinite(reference).all()):
        sys.exit(f"{name}: the output holds NaN or inf (minisd: {not torch.isfinite(ours).all()}"
                 f", reference: {not torch.isfinite(reference).all()}); nothing was timed")
    error = timing.relative_error(ours, reference)
    print(f"{name}: relative error {error:.2e}", flush=True)
    if not error < tolerance:
        sys.exit(f"{name}: minisd and the reference disagree (relative error {error:.2e} ≥ "
                 f"--tolerance {tolerance:g}); nothing was timed")
    return error


def main(argv=None):
    p = timing.parser("gpu", __doc__.splitlines()[0])
    p.set_defaults(runs=5, warmup=2)
    p.add_argument("--compile", action="store_true", help="torch.compile U-Nets and VAEs")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights")
    p.add_argument("--steps", type=int, help="pipeline steps (default 50; 3 with --tiny)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                   help="default float16 on CUDA, float32 on the CPU")
    p.add_argument("--tolerance", type=float, default=2e-2,
                   help="largest relative error accepted between minisd and the reference")
    args = timing.parse(p, argv)
    if not torch.cuda.is_available() and not args.tiny:
        p.exit(2, f"benchmarks/gpu.py needs an NVIDIA GPU with CUDA, and torch "
                  f"{torch.__version__} sees none here (torch.cuda.is_available() is False). "
                  "Run it on a GPU machine with a CUDA build of PyTorch, or pass --tiny for "
                  "the CPU smoke test.\n")
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    steps = args.steps or (3 if args.tiny else 50)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    print(f"building SD v1 models ({'tiny' if args.tiny else 'full size'}) on {device} in "
          f"{dtype}", flush=True)
    pairs = build_models(args.tiny, device, dtype, args.channels_last)
    if args.compile:  # in place; the VAEs' decoders, which `decode` calls
        for model in (*pairs["unet"], *(vae.decoder for vae in pairs["vae"])):
            model.compile()
    unet, vae, text = pairs["unet"], pairs["vae"], pairs["text_encoder"]

    generator = torch.Generator(device).manual_seed(0)
    latent = unet[0].config.sample_size
    sample = torch.randn(2, 4, latent, latent, generator=generator, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet[0].config.cross_attention_dim, generator=generator,
                          device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    z = torch.randn(1, 4, latent, latent, generator=generator, device=device, dtype=dtype)
    ids = CLIPTokenizer.openai()([PROMPT, ""]).to(device)
    noise = torch.randn(1, 4, latent, latent, generator=generator, device=device, dtype=dtype)

    with tempfile.TemporaryDirectory(prefix="minisd-gpu-") as folder:
        ours_pipe, reference_pipe = build_pipelines(pairs, Path(folder))
    size = latent * vae[0].downsampling_factor
    shared = {"height": size, "width": size, "num_inference_steps": steps,
              "guidance_scale": GUIDANCE}
    run_ours = partial(ours_pipe, PROMPT, progress=False, latents=noise, **shared)
    run_reference = partial(reference_pipe, PROMPT, latents=noise, **shared)

    results, errors = {}, {}
    with torch.inference_mode():
        print("checking that minisd and the reference agree", flush=True)
        errors["unet"] = check("U-Net", unet[0](sample, t, context),
                               unet[1](sample, t, context).sample, args.tolerance)
        errors["vae_decode"] = check("VAE decode", vae[0].decode(z), vae[1].decode(z).sample,
                                     args.tolerance)
        errors["text_encoder"] = check("text encoder", text[0](ids).last_hidden_state,
                                       text[1](ids).last_hidden_state, args.tolerance)
        errors["pipeline"] = check(f"pipeline ({steps} steps)",
                                   run_ours(output_type="pt").images,
                                   run_reference(output_type="pt").images.float(),
                                   args.tolerance)
        timed = (("unet", partial(unet[0], sample, t, context),
                  partial(unet[1], sample, t, context), args.warmup, args.runs),
                 ("vae_decode", partial(vae[0].decode, z), partial(vae[1].decode, z),
                  args.warmup, args.runs),
                 ("text_encoder", partial(text[0], ids), partial(text[1], ids), args.warmup,
                  args.runs),
                 # the agreement check above was the pipelines' warm-up
                 ("pipeline", run_ours, run_reference, 0, 3))
        for name, ours, reference, warmup, runs in timed:
            print(f"timing {name}", flush=True)
            results[name] = {"relative_error": errors[name],
                             **timing.compare(ours, reference, runs, warmup, sync)}

    seconds = time.perf_counter() - start
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    payload = {"benchmark": "gpu", "config": "tiny" if args.tiny else "SD v1",
               "device": gpu or "cpu", "dtype": str(dtype).removeprefix("torch."),
               "compile": args.compile, "channels_last": args.channels_last,
               "picture": [size, size], "pipeline_steps": steps, "scheduler": "ddim",
               "guidance_scale": GUIDANCE, "cuda": torch.version.cuda, "results": results,
               "total_seconds": seconds, **timing.environment()}
    timing.write(args.out, payload)
    print(f"\n{gpu or 'CPU'}, {payload['dtype']}, compile={args.compile}, "
          f"channels_last={args.channels_last}, {seconds:.0f} s in all")
    print(timing.table(summary_rows(results, size, steps),
                       [("what", "what"), ("unit", "unit"), ("minisd", "minisd"),
                        ("reference", "diffusers"), ("ratio", "minisd/diffusers time"),
                        ("error", "rel. error")]))


def summary_rows(results: dict, size: int, steps: int) -> list[dict]:
    """The closing table: U-Net in it/s, the rest in seconds (medians)."""
    def row(name, what, unit, per_second=False):
        r = results[name]
        ours, ref = r["minisd"]["median"], r["reference"]["median"]
        if per_second:
            ours, ref = 1 / ours, 1 / ref
        return {"what": what, "unit": unit, "minisd": ours, "reference": ref,
                "ratio": r["ratio"], "error": f"{r['relative_error']:.1e}"}

    return [row("unet", f"U-Net, batch 2 at {size}²", "it/s", per_second=True),
            row("vae_decode", f"VAE decode to {size}²", "s"),
            row("text_encoder", "text encoder 2×77", "s"),
            row("pipeline", f"pipeline, {steps} steps, {size}²", "s/picture")]


if __name__ == "__main__":
    main()
