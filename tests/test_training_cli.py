"""The command line of the training wing (`python -m minisd.training`, minisd.training.__main__):
an explicit table of commands, each built from one settings dataclass, callable from Python."""

import inspect
import os
import subprocess
import sys
from dataclasses import MISSING, dataclass, field, fields

import pytest
import torch

from minisd.training import clip, stages, unet, vae
from minisd.training.__main__ import (
    COMMANDS,
    add_options,
    build_parser,
    field_help,
    main,
    settings_from_args,
)
from minisd.training.clip import CLIPTrainConfig
from minisd.training.loop import TrainConfig
from minisd.training.stages import AllConfig
from minisd.training.unet import UNetTrainConfig
from minisd.training.vae import VAETrainConfig

RECIPES = {"vae": VAETrainConfig, "clip": CLIPTrainConfig, "unet": UNetTrainConfig}


def parse(argv: list[str]):
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    return settings_from_args(COMMANDS[args.command].settings, args)


def test_the_table_names_every_command_and_its_settings():
    assert {name: c.settings for name, c in COMMANDS.items()} == {**RECIPES, "all": AllConfig}
    for settings in RECIPES.values():
        assert issubclass(settings, TrainConfig)
    for module in (vae, clip, unet, stages):  # no command line written by hand beside them
        assert "argparse" not in inspect.getsource(module), module.__name__


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_come_from_the_dataclass_alone(command):
    """No option repeats a default: parsing no options gives the dataclass's own defaults,
    and a recipe's redeclared loop settings differ from the loop's (they are its own)."""
    settings = COMMANDS[command].settings
    assert parse([command]) == settings()
    if command in RECIPES:
        own = {f.name for f in fields(settings) if f.name in TrainConfig.__dataclass_fields__
               and f.default != TrainConfig.__dataclass_fields__[f.name].default}
        assert {"out_dir", "name"} <= own


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_field_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    settings = COMMANDS[command].settings
    for f in fields(settings):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert " ".join(field_help(settings, f.name).split()) in text, f.name
    if command == "unet":
        assert "--steps STEPS optimiser steps of the whole run (default: 5000)" in text


def test_options_are_named_like_the_api_and_typed():
    config = parse(["unet", "--grad-clip", "none", "--ema-decay", "0.99", "--betas", "0.8",
                    "0.95", "--schedule", "constant", "--attention-head-dim", "2", "4", "4",
                    "--only-cross-attention", "true", "false", "false", "--no-progress",
                    "--cache-dir", "none", "--prediction-type", "epsilon"])
    assert config.grad_clip is None and config.ema_decay == 0.99
    assert config.betas == (0.8, 0.95) and config.schedule == "constant"
    assert config.attention_head_dim == (2, 4, 4)
    assert config.only_cross_attention == (True, False, False)
    assert config.progress is False and config.cache_dir is None
    assert config.prediction_type == "epsilon"
    assert config.steps == UNetTrainConfig.steps  # the recipe's own default, untouched
    assert parse(["vae", "--crop-size", "none"]).crop_size is None

    parser, _ = build_parser()
    for bad in (["unknown-model"], ["unet", "--schedule", "linear"], [],
                ["unet", "--heads", "1"], ["unet", "--only-cross-attention", "yes"],
                ["unet", "--prediction-type", "sample"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_values_the_settings_refuse_exit_with_a_usage_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unet", "--attention-head-dim", "1", "2"])
    assert exit_info.value.code == 2
    assert ("UNetTrainConfig.attention_head_dim must be one value per level (3, as "
            "block_out_channels), got (1, 2)") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["all", "--vae-options", "--lr -1"])
    assert "--vae-options: VAETrainConfig.lr must be positive, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["all", "--clip-options", "--output x"])
    assert "--output is set by `all`" in capsys.readouterr().err


def test_a_field_without_help_is_refused():
    @dataclass
    class Bare:
        size: int = 3
        name: str = field(default="x", metadata={"help": "a name"})

    with pytest.raises(TypeError, match="Bare.size has no help text"):
        add_options(build_parser()[0], Bare)
    assert field_help(Bare, "name") == "a name"
    assert field_help(UNetTrainConfig, "steps") == field_help(TrainConfig, "steps")


def test_every_field_has_a_default_and_help():
    for settings in (*RECIPES.values(), AllConfig):
        for f in fields(settings):
            assert f.default is not MISSING or f.default_factory is not MISSING, f.name
            assert field_help(settings, f.name)


def test_the_same_entry_runs_from_python_and_as_a_module(tmp_path, capsys):
    """`main([...])` from Python and `python -m minisd.training` run the same recipe (bit for
    bit with the same number of threads: the subprocess gets this process's)."""
    options = ["vae", "--steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress",
               "--out-dir", "none", "--block-out-channels", "8", "16", "--norm-num-groups", "4",
               "--crop-size", "16", "--full-steps", "1", "--full-batch-size", "4",
               "--train-samples", "16", "--scale-samples", "8", "--eval-samples", "0"]
    result = main([*options, "--output", str(tmp_path / "python")])
    assert len(result.crop_history["loss"]) == 2 and len(result.full_history["loss"]) == 1
    assert "crops: 2 steps" in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "minisd.training", *options, "--output",
                          str(tmp_path / "module")], capture_output=True, text=True,
                         timeout=300, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert run.returncode == 0, run.stderr
    assert "crops: 2 steps" in run.stdout and "whole pictures: 1 steps" in run.stdout
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "python" / "vae" / name).read_bytes() == \
            (tmp_path / "module" / "vae" / name).read_bytes()
