"""The command line: a prompt in, PNG files out.

    python -m minisd "a red circle on the left" -o out.png
    python -m minisd "a large blue square" --image start.png --strength 0.6 -o edit.png
    python -m minisd "a cat" --model path/to/v1-5-pruned-emaonly.safetensors --n 4

Uses the bundled model (`minisd.package_data.bundled_model()`) unless --model names a
diffusers model folder, an SD v1 single file (.safetensors, .ckpt) or a Hugging Face Hub id.
The options carry the API's names (`--num-inference-steps`, `--guidance-scale`,
`--negative-prompt`, `--num-images-per-prompt`); the short forms `--steps`, `--guidance`,
`--negative` and `--n` work too. Steps and guidance default to the model's own
(`StableDiffusionPipeline.sampling_defaults`).

Every PNG carries what made it in its text chunks (prompt, negative_prompt, seed,
num_inference_steps, guidance_scale, scheduler, timestep_spacing, model, device, dtype, size,
and image and strength for img2img): `PIL.Image.open(path).text` reads them back. Picture i
of --n uses seed + i, so `--seed <its seed>` alone reproduces it at the same --dtype (the
noise is drawn in the model's dtype); without --seed the seed drawn is printed.

No mistake costs work: the output, the prompt, the picture, the sizes, the step count and the
memory a run needs are all checked before any drawing starts, and a problem ends with one line
on stderr and exit status 2 (the README lists what is refused and why).
"""

import argparse
import math
import secrets
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from minisd.images import load_image
from minisd.pipeline import DEFAULT_STRENGTH, StableDiffusionPipeline, nearest_multiples
from minisd.schedulers import SCHEDULERS, TIMESTEP_SPACINGS, from_name, scheduler_name

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MODEL_HELP = ("--model takes a model folder (with model_index.json), an SD v1 .safetensors or "
              ".ckpt file, or a Hugging Face Hub id such as org/name")
# the library's advice names its Python arguments; here it names the options
CLI_WORDS = {"pass trust_pickle=True (command line: --trust-pickle)": "add --trust-pickle",
             "pick another with scheduler=": "pick another with --scheduler",
             "torch_dtype=torch.float32, command line --dtype float32": "--dtype float32"}


class Refusal(Exception):
    """A mistake the command line refuses, before drawing, with one line and status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's usage errors, in one line like every other refusal."""
        self.exit(2, f"minisd: error: {message} (see python -m minisd --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minisd", description="Generate pictures from a text prompt.")
    add = parser.add_argument
    add("prompt", help="what to draw (empty: draw without a prompt)")
    add("-o", "--output", default="out.png",
        help="PNG path in an existing, writable folder (default: out.png); with --n > 1 the "
             "pictures are numbered NAME-0.png, NAME-1.png, …")
    add("--negative-prompt", "--negative", dest="negative_prompt", default="",
        help="what to steer away from (default: nothing)")
    add("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
        help="denoising steps (default: the model's own)")
    add("--guidance-scale", "--guidance", dest="guidance_scale", type=float, default=None,
        help="classifier-free guidance scale; 1 = no guidance (default: the model's own)")
    add("--seed", type=int, default=None, help="random seed (default: drawn, and printed)")
    add("--scheduler", choices=sorted(SCHEDULERS), default=None,
        help="sampler, on the model's noise schedule (default: the model's own)")
    add("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
        help="the grid of timesteps (default: the model's own)")
    add("--height", type=int, default=None,
        help="picture height in pixels, a multiple of the VAE's factor: 8 for SD, 4 for the "
             "bundled model (default: the model's size; with --image: resizes the picture)")
    add("--width", type=int, default=None,
        help="picture width, like --height")
    add("--num-images-per-prompt", "--n", dest="n", type=int, default=1,
        help="how many pictures (default: 1)")
    add("--image", default=None,
        help="img2img: start from this picture (any format and mode Pillow reads)")
    add("--strength", type=float, default=None,
        help=f"img2img: how much of the picture to redraw, 0 … 1 (default: "
             f"{DEFAULT_STRENGTH}); the last int(steps × strength) steps run")
    add("--model", default=None,
        help="model folder, SD v1 single file or Hub id (default: the bundled model)")
    add("--device", default=None, help="cuda, mps or cpu (default: the best)")
    add("--dtype", choices=sorted(DTYPES), default=None,
        help="default: float16 on CUDA, float32 elsewhere")
    add("--threads", type=int, default=1,
        help="CPU threads (default: 1: on a busy 2-core machine the bundled model drew 3× "
             "faster with one thread than with two, whose OpenMP threads wait for a descheduled "
             "partner; give the number of free cores for SD v1 on a CPU)")
    add("--trust-pickle", action="store_true",
        help="allow .ckpt/.bin files holding Python objects (runs their code: only for files "
             "you trust)")
    return parser


def load(model: str | None, device: str | None, dtype: torch.dtype | None,
         trust_pickle: bool) -> StableDiffusionPipeline:
    """The pipeline for --model: a single file by its suffix, else a folder or Hub id."""
    kwargs = {"torch_dtype": dtype, "device": device, "trust_pickle": trust_pickle}
    if model is not None and Path(model).suffix in SINGLE_FILE_SUFFIXES:
        return StableDiffusionPipeline.from_single_file(model, **kwargs)
    return StableDiffusionPipeline.from_pretrained(model, **kwargs)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded, what would fail late or do something unasked.
    Raises Refusal with a message naming the option and what would work."""
    if args.n < 1:
        raise Refusal(f"--n must be at least 1, got {args.n}")
    if args.threads < 1:
        raise Refusal(f"--threads must be at least 1, got {args.threads}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise Refusal(f"--num-inference-steps must be at least 1, got {args.num_inference_steps}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise Refusal(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise Refusal(f"--{name} must be a positive number of pixels, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise Refusal(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.strength is not None and args.image is None:
        raise Refusal("--strength needs --image, the picture to start from")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise Refusal(f"--strength must lie in [0, 1], got {args.strength}")
    for option, text in (("prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        _check_utf8(option, text)
    check_output(args.output)
    _check_model_path(args.model)
    _check_device(args.device)


def _check_utf8(option: str, text: str) -> None:
    """Python hands undecodable argument bytes over as lone surrogates (PEP 383)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00
        raise Refusal(f"the {option} is not valid UTF-8 (byte 0x{byte:02x} at character "
                      f"{error.start}); pass the text in UTF-8") from None


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def check_output(output: str) -> None:
    """The pictures can be written where -o says: a .png name, in an existing folder that
    accepts files. Raises Refusal."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise Refusal(f"-o/--output must be a .png file (the settings go in its text chunks), "
                      f"got {output!r}")
    if path.is_dir():
        raise Refusal(f"-o/--output {output!r} is a folder; give a file name ending in .png")
    if not path.parent.is_dir():
        raise Refusal(f"-o/--output: the folder {str(path.parent)!r} does not exist; create it "
                      "first")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".minisd-", suffix=".png"):
            pass
    except OSError as error:
        raise Refusal(f"-o/--output: cannot write into the folder {str(path.parent)!r} "
                      f"({error.strerror or error}); choose another folder") from None


def check_numbered_outputs(output: str, n: int) -> None:
    """With --n > 1, no numbered name (NAME-0.png, …) is a folder (checked once --n is known
    to fit in memory). Raises Refusal."""
    taken = next((p for p in output_paths(output, n) if n > 1 and p.is_dir()), None)
    if taken is not None:
        raise Refusal(f"-o/--output {output!r} with --n {n} writes {str(taken)!r}, which is a "
                      "folder; choose another name")


def _check_model_path(model: str | None) -> None:
    if model is None:
        return
    path = Path(model)
    if path.is_file() and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise Refusal(f"--model {model} is a file that is not a model; {MODEL_HELP}")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise Refusal(f"--model {model} is a folder without model_index.json; {MODEL_HELP}")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise Refusal(f"--device must be cpu, cuda (or cuda:N) or mps, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only build, or no "
                      "driver); leave --device out to use the best device there is")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise Refusal("--device mps: Apple's MPS is not available here; leave --device out to "
                      "use the best device there is")


def _load(args: argparse.Namespace) -> StableDiffusionPipeline:
    """`load`, with the loaders' errors told in the command line's terms (and the warnings
    of a load that fails dropped: the error says what matters)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            pipe = load(args.model, args.device, DTYPES.get(args.dtype), args.trust_pickle)
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return pipe
    except (FileNotFoundError, ValueError, TypeError) as error:
        message = _one_line(error)
        if "weights_only" in message:    # PyTorch's own advice names its keyword arguments
            message = (message.split(": ", 1)[0] + ": it is not a plain file of tensors, which "
                       "is all minisd reads without running code from it; if it comes from a "
                       "source you trust, add --trust-pickle")
        raise Refusal(message) from None


def _picture(args: argparse.Namespace) -> torch.Tensor | None:
    """--image as a tensor (3, H, W) in [−1, 1], resized when --height/--width are given."""
    if args.image is None:
        return None
    try:
        picture = load_image(args.image)
        if args.height is not None or args.width is not None:
            size = (args.height or picture.shape[1], args.width or picture.shape[2])
            picture = load_image(args.image, size=size)
    except (FileNotFoundError, ValueError) as error:
        raise Refusal(f"--image: {_one_line(error)}") from None
    return picture


def _run_scheduler(pipe: StableDiffusionPipeline, args: argparse.Namespace):
    """The scheduler the options ask for: None (the model's), or one by name and/or spacing
    built on the model's config."""
    if args.scheduler is None and args.timestep_spacing is None:
        return None
    spacing = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {}
    return from_name(args.scheduler or scheduler_name(pipe.scheduler), pipe.scheduler.config,
                     **spacing)


def check_with_model(pipe: StableDiffusionPipeline, args: argparse.Namespace, scheduler,
                     picture: torch.Tensor | None, steps: int, guidance: float) -> None:
    """What needs the model: the step count its grid can give, sizes that fit its VAE, and the
    pipeline's own `check_inputs` (memory included). Raises Refusal in the options' terms."""
    sched = scheduler or pipe.scheduler
    limit = sched.max_inference_steps
    if steps > limit:
        c = sched.config
        others = sched.spacings_allowing(steps)
        offset = f" with steps_offset {c.steps_offset}" if c.timestep_spacing == "leading" else ""
        raise Refusal(f"--num-inference-steps {steps} is more than the {limit} steps the "
                      f"{c.timestep_spacing} grid{offset} of {type(sched).__name__} can give; "
                      f"use --num-inference-steps {limit} or fewer"
                      + (f", or --timestep-spacing {others[0]}" if others else ""))
    f = pipe.vae_scale_factor
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % f:
            raise Refusal(f"--{name} {value} is not a multiple of {f} (the model's VAE "
                          f"factor); use --{name} {nearest_multiples(value, f)}")
    if picture is not None and (picture.shape[1] % f or picture.shape[2] % f):
        h, w = (max(f, round(side / f) * f) for side in picture.shape[1:])
        native = pipe.unet.config.sample_size * f
        raise Refusal(f"--image is {picture.shape[2]}×{picture.shape[1]} pixels (width×height); "
                      f"both must be multiples of {f} (the model's VAE factor): add --height "
                      f"{native} --width {native} to resize it to the size the model was "
                      f"trained at, or --height {h} --width {w} to keep its size")
    try:
        pipe.check_inputs(args.prompt, args.negative_prompt, args.height, args.width, steps,
                          guidance, args.n, scheduler=scheduler, image=picture,
                          strength=args.strength)
    except (ValueError, TypeError) as error:
        raise Refusal(_one_line(error)) from None


def notices(pipe: StableDiffusionPipeline, args: argparse.Namespace, seed_drawn: int | None):
    """One line on stderr for each thing a user should know before the drawing starts."""
    if seed_drawn is not None:
        _note(f"seed {seed_drawn} (--seed {seed_drawn} draws the same picture again)")
    if not args.prompt.strip():
        _note("the prompt is empty: drawing without a prompt (unconditionally)")
    tokenizer = pipe.tokenizer
    room = tokenizer.model_max_length - 2
    for option, text in (("prompt", args.prompt), ("negative prompt", args.negative_prompt)):
        tokens = tokenizer.encode(text)
        if len(tokens) > room:
            kept = tokenizer.decode(tokens[room - 4:room])
            _note(f"the {option} is {len(tokens)} tokens long; the model reads the first {room}, "
                  f"up to “…{kept}”")


def _note(message: str) -> None:
    print(f"minisd: {message}", file=sys.stderr)


def _one_line(error: BaseException | str) -> str:
    """A message on one line (loaders list keys on separate lines), in the options' words."""
    message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    for api, cli in CLI_WORDS.items():
        message = message.replace(api, cli)
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None):
    _note(f"warning: {_one_line(message)}")


def save(images, args: argparse.Namespace, seed: int, steps: int, guidance: float,
         scheduler, pipe: StableDiffusionPipeline) -> None:
    """Write the PNGs, each with the settings that reproduce it (the seed's noise depends on
    the dtype too), and print their paths."""
    model = args.model or "minisd-shapes (bundled)"
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
                "num_inference_steps": steps, "guidance_scale": guidance,
                "scheduler": scheduler_name(scheduler),
                "timestep_spacing": scheduler.config.timestep_spacing, "model": model,
                "device": pipe.device.type, "dtype": str(pipe.dtype).removeprefix("torch.")}
    if args.image is not None:
        settings |= {"image": args.image, "strength": args.strength}
    for i, (image, path) in enumerate(zip(images, output_paths(args.output, args.n),
                                          strict=True)):
        info = PngInfo()
        for key, value in {**settings, "seed": seed + i, "size": f"{image.width}x{image.height}",
                           "software": "minisd"}.items():
            info.add_text(key, str(value))
        image.save(path, pnginfo=info)
        print(path)


def run(args: argparse.Namespace) -> int:
    """Check, load, check against the model, tell, draw, save. Raises Refusal."""
    check_arguments(args)
    torch.set_num_threads(args.threads)
    if args.image is not None and args.strength is None:
        args.strength = DEFAULT_STRENGTH
    picture = _picture(args)
    pipe = _load(args)
    scheduler = _run_scheduler(pipe, args)
    defaults = pipe.sampling_defaults
    steps = (defaults.num_inference_steps if args.num_inference_steps is None
             else args.num_inference_steps)
    guidance = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
    check_with_model(pipe, args, scheduler, picture, steps, guidance)
    check_numbered_outputs(args.output, args.n)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    notices(pipe, args, None if args.seed is not None else seed)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.n)]
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                  width=args.width, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=args.n, generator=generators, scheduler=scheduler,
                  image=picture, strength=args.strength).images
    save(images, args, seed, steps, guidance, scheduler or pipe.scheduler, pipe)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0; 2 after a refusal or a usage error,
    told in one line on stderr before any drawing; 1 for an unexpected failure (one line too);
    130 when interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:          # --help, or a usage error told in one line
        return done.code
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning       # one line each
            warnings.filterwarnings("ignore", message=r"prompt \d+ has \d+ tokens")  # see notices
            return run(args)
    except Refusal as refusal:
        print(f"minisd: error: {refusal}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minisd: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (never a traceback: one line, with what it was)
        print(f"minisd: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
