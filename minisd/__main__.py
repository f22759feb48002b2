"""The command line: a prompt in, PNG files out.

    python -m minisd "a red circle on the left" -o out.png
    python -m minisd "a cat" --model path/to/v1-5-pruned-emaonly.safetensors --steps 25 --n 4

Uses the bundled model (`minisd.package_data.bundled_model()`) unless --model names a diffusers model folder, an
SD v1 single file (.safetensors, .ckpt) or a Hugging Face Hub id. Every PNG carries what
made it in its text chunks (prompt, negative_prompt, seed, steps, guidance, scheduler,
model, size): `PIL.Image.open(path).text` reads them back. Picture i of --n uses seed + i,
so `--seed <its seed>` alone reproduces it.
"""

import argparse
import math
import secrets
import sys
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from minisd.pipeline import StableDiffusionPipeline
from minisd.schedulers import SCHEDULERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisd",
                                     description="Generate pictures from a text prompt.")
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("-o", "--output", default="out.png",
                        help="PNG path in an existing folder (default: out.png); with --n > 1 the pictures are "
                             "numbered NAME-0.png, NAME-1.png, …")
    parser.add_argument("--negative", default="", help="what to steer away from (default: nothing)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale (default: 7.5; 1 = no guidance)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sampler (default: the model's own)")
    parser.add_argument("--height", type=int, default=None,
                        help="picture height, a multiple of the VAE's factor: 8 for SD, 4 for "
                             "the bundled model (default: the model's size)")
    parser.add_argument("--width", type=int, default=None,
                        help="picture width, a multiple of the VAE's factor (default: the "
                             "model's size)")
    parser.add_argument("--n", type=int, default=1, help="how many pictures (default: 1)")
    parser.add_argument("--model", default=None,
                        help="model folder, SD v1 single file or Hub id (default: the bundled model)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float16 on CUDA, float32 elsewhere")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow .ckpt/.bin files holding Python objects (runs their code: "
                             "only for files you trust)")
    return parser


def load(model: str | None, device: str | None, dtype: torch.dtype | None,
         trust_pickle: bool) -> StableDiffusionPipeline:
    """The pipeline for --model: a single file by its suffix, else a folder or Hub id."""
    kwargs = {"torch_dtype": dtype, "device": device, "trust_pickle": trust_pickle}
    if model is not None and Path(model).suffix in SINGLE_FILE_SUFFIXES:
        return StableDiffusionPipeline.from_single_file(model, **kwargs)
    return StableDiffusionPipeline.from_pretrained(model, **kwargs)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded, what would fail late or do something unasked:
    exits through `parser.error` (status 2) with a message naming the option."""
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if not math.isfinite(args.guidance):
        parser.error(f"--guidance must be a finite number, got {args.guidance}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive number of pixels, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        parser.error(f"-o/--output must be a .png file (the settings go in its text chunks), "
                     f"got {args.output!r}")
    if output.is_dir():
        parser.error(f"-o/--output {args.output!r} is a folder; give a file name ending in .png")
    if not output.parent.is_dir():
        parser.error(f"-o/--output: the folder {str(output.parent)!r} does not exist; create it "
                     f"first")
    if args.device is not None:
        kind = args.device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps"):
            parser.error(f"--device must be cpu, cuda (or cuda:N) or mps, got {args.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only build, or no "
                         "driver); leave --device out to use the best device there is")
        if kind == "mps" and not torch.backends.mps.is_available():
            parser.error("--device mps: Apple's MPS is not available here; leave --device out "
                         "to use the best device there is")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 with a message on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    try:
        pipe = load(args.model, args.device, DTYPES.get(args.dtype), args.trust_pickle)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.n)]
        images = pipe(args.prompt, negative_prompt=args.negative, height=args.height,
                      width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.n,
                      generator=generators, scheduler=args.scheduler).images
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"minisd: error: {error}", file=sys.stderr)
        return 2
    scheduler = args.scheduler or type(pipe.scheduler).__name__
    model = args.model or "minisd-shapes (bundled)"
    for i, (image, path) in enumerate(zip(images, output_paths(args.output, args.n),
                                          strict=True)):
        info = PngInfo()
        for key, value in (("prompt", args.prompt), ("negative_prompt", args.negative),
                           ("seed", seed + i), ("steps", args.steps),
                           ("guidance", args.guidance), ("scheduler", scheduler),
                           ("model", model), ("size", f"{image.width}x{image.height}"),
                           ("software", "minisd")):
            info.add_text(key, str(value))
        image.save(path, pnginfo=info)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
