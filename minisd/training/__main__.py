"""`python -m minisd.training <command> [options]`: train minisd's models.

    python -m minisd.training all                       # the whole bundled model
    python -m minisd.training vae --steps 100 --output runs/try
    torchrun --nproc_per_node=2 -m minisd.training unet  # DDP: one process per core or GPU
    python -m minisd.training unet --help               # every option, with its default

`COMMANDS` is the explicit table of commands. Each command's settings are one dataclass (a
recipe's `…TrainConfig`, which extends the loop's `TrainConfig`, or `AllConfig`), and its
command line is built from it: every field is an option named like the field
(`block_out_channels` → `--block-out-channels`), with the field's default and the help text
of its metadata (a loop setting that a recipe redeclares with its own default keeps
`TrainConfig`'s help). `x | None` fields read 'none' as None; tuples take several values;
booleans are `--x` / `--no-x`. The same entry works from Python:
`main(["vae", "--steps", "100"])` returns what the command's `run` returns.
"""

import argparse
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields

from minisd.training import clip, stages, unet, vae
from minisd.training.loop import close_distributed


@dataclass(frozen=True)
class Command:
    """A command: its settings dataclass (one option per field), what runs them, and its help."""

    settings: type
    run: Callable
    help: str


COMMANDS = {
    "vae": Command(vae.VAETrainConfig, vae.run,
                   "train the VAE on the shapes world; writes <output>/vae/"),
    "clip": Command(clip.CLIPTrainConfig, clip.run,
                    "learn the BPE vocabulary of the shapes world's captions and train CLIP's "
                    "text and image towers contrastively; writes <output>/tokenizer/, "
                    "text_encoder/ and clip_image/"),
    "unet": Command(unet.UNetTrainConfig, unet.run,
                    "train the U-Net on the VAE's latents and the frozen text encoder's "
                    "context; writes <output>/unet/, scheduler/ and model_index.json"),
    "all": Command(stages.AllConfig, stages.run_all,
                   "train the whole bundled model into one folder: vae and clip at once, then "
                   "unet (minisd.training.stages)"),
}


def field_help(settings: type, name: str) -> str:
    """The help text of field `name`: its metadata's, or that of the nearest base class that
    declares the field with one. Raises TypeError when there is none."""
    for cls in settings.__mro__:
        declared = getattr(cls, "__dataclass_fields__", {}).get(name)
        if declared is not None and "help" in declared.metadata:
            return declared.metadata["help"]
    raise TypeError(f"{settings.__name__}.{name} has no help text in its field metadata")


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _reader(kind) -> tuple[Callable[[str], object], int | str | None]:
    """(argparse `type`, `nargs`) for a field type: int, float, str, bool inside tuples,
    `tuple[x, ...]` (one or more), `tuple[x, x]` (exactly two), `x | None` ('none')."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:
        base, nargs = _reader(next(a for a in args if a is not type(None)))
        return (lambda text: None if text.lower() == "none" else base(text)), nargs
    if typing.get_origin(kind) is tuple:
        return _reader(args[0])[0], "+" if args[-1] is Ellipsis else len(args)
    return (_boolean if kind is bool else kind), None


def add_options(parser: argparse.ArgumentParser, settings: type) -> None:
    """One option per field of the dataclass `settings`, defaulting to its default."""
    defaults = settings()
    for f in fields(settings):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=field_help(settings, f.name))
            continue
        read, nargs = _reader(f.type)
        parser.add_argument(flag, type=read, nargs=nargs, default=default,
                            choices=f.metadata.get("choices"), help=field_help(settings, f.name))


def settings_from_args(settings: type, args: argparse.Namespace):
    """The `settings` dataclass of parsed options (lists become tuples); it validates them."""
    values = {f.name: getattr(args, f.name) for f in fields(settings)}
    return settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser of `python -m minisd.training`, and its sub-parser of each command."""
    parser = argparse.ArgumentParser(
        prog="python -m minisd.training",
        description="Train minisd's models. vae, clip and unet also run under "
                    "`torchrun --nproc_per_node=N` on N processes (DDP).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    subparsers = {}
    for name, command in COMMANDS.items():
        subparsers[name] = commands.add_parser(
            name, help=command.help, description=command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_options(subparsers[name], command.settings)
    return parser, subparsers


def check_stage_options(settings: stages.AllConfig,
                        subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """Parse and validate every stage's command line of `all` before anything runs, so that a
    mistake in --unet-options stops the run at once rather than after the first stages."""
    for stage, command in stages.stage_commands(settings).items():
        argv = command.argv[command.argv.index(stage) + 1:]
        try:
            settings_from_args(COMMANDS[stage].settings, subparsers[stage].parse_args(argv))
        except ValueError as e:
            subparsers["all"].error(f"--{stage}-options: {e}")


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line), run the command, leave the process group.
    A value its settings refuse exits with argparse's usage message (status 2), for `all`
    also a stage option; a failed `all` exits with a one-line message (status 1). Returns what the command's `run` returns."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        settings = settings_from_args(command.settings, args)
    except ValueError as e:
        subparsers[args.command].error(str(e))
    if args.command == "all":
        check_stage_options(settings, subparsers)
    try:
        return command.run(settings)
    except stages.TrainingFailed as e:
        sys.exit(f"python -m minisd.training all: {e}")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
