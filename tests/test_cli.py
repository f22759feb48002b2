"""The command line `python -m minisd`, on a tiny random model folder saved by minisd."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from minisd import checkpoints, package_data
from minisd.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def test_writes_pngs_with_their_settings(model, tmp_path, capsys):
    out = tmp_path / "pics" / "circle.png"
    out.parent.mkdir()
    status = main(["a red circle on the left", "-o", str(out), "--model", str(model),
                   "--steps", "3", "--seed", "5", "--n", "2", "--guidance", "5",
                   "--negative", "blue", "--scheduler", "euler", "--device", "cpu",
                   "--dtype", "float32", "--height", "64", "--width", "128"])
    assert status == 0
    paths = [tmp_path / "pics" / "circle-0.png", tmp_path / "pics" / "circle-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for i, path in enumerate(paths):
        image = Image.open(path)
        assert image.size == (128, 64)
        assert image.text == {"prompt": "a red circle on the left", "negative_prompt": "blue",
                              "seed": str(5 + i), "steps": "3", "guidance": "5.0",
                              "scheduler": "euler", "model": str(model), "size": "128x64",
                              "software": "minisd"}
    # picture 1 was made with seed 6: that seed alone reproduces it
    again = tmp_path / "again.png"
    assert main(["a red circle on the left", "-o", str(again), "--model", str(model),
                 "--steps", "3", "--seed", "6", "--guidance", "5", "--negative", "blue",
                 "--scheduler", "euler", "--device", "cpu", "--height", "64",
                 "--width", "128"]) == 0
    first, second = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], again))
    assert np.abs(first - second).max() <= 1     # equal up to the batch's float rounding


def test_defaults_the_scheduler_and_seed_from_the_model(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["blue", "-o", str(out), "--model", str(model), "--steps", "2"]) == 0
    text = Image.open(out).text
    assert text["scheduler"] == "DPMSolverMultistepScheduler"
    assert 0 <= int(text["seed"]) < 2 ** 31
    assert Image.open(out).size == (64, 64)
    assert capsys.readouterr().out.strip() == str(out)


def test_missing_bundled_model_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(package_data, "data_dir", lambda: tmp_path)
    assert main(["a red circle", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "minisd: error: the bundled model" in err and "python -m minisd.training all" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_options_are_clear_errors(model, tmp_path, capsys):
    assert main(["x", "--model", str(model), "--height", "60", "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x", "--scheduler", "pndm"])
    assert "invalid choice: 'pndm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x", "--n", "0"])
    assert "--n must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--height", "0"], "--height must be a positive number of pixels"),
    (["--width", "-8"], "--width must be a positive number of pixels"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["-o", "noext"], "must be a .png file"),
    (["-o", "picture.jpg"], "must be a .png file"),
    (["--device", "tpu"], "--device must be cpu, cuda (or cuda:N) or mps"),
])
def test_options_refused_before_loading(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["x", *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_output_must_go_into_an_existing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["x", "-o", str(tmp_path / "missing" / "x.png")])
    assert "does not exist; create it first" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SystemExit):
        main(["x", "-o", str(tmp_path / "folder.png")])
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine "
                    "without CUDA")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["x", "--device", "cuda", "-o", str(tmp_path / "x.png")])
    assert "PyTorch sees no CUDA GPU here" in capsys.readouterr().err


def test_single_files_go_through_from_single_file(model, tmp_path, capsys):
    """A .safetensors --model is read as an SD v1 single file: this tiny one does not have SD
    v1's shapes, which the error says."""
    parts = checkpoints.load_pretrained(model)
    path = checkpoints.save_single_file(tmp_path / "tiny.safetensors", parts["unet"],
                                        parts["vae"], parts["text_encoder"])
    assert main(["x", "--model", str(path), "-o", str(tmp_path / "x.png")]) == 2
    assert "shape mismatches: model.diffusion_model." in capsys.readouterr().err


def test_python_dash_m_runs_with_a_progress_bar(model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "minisd", "a red circle", "-o",
                             str(tmp_path / "out.png"), "--model", str(model), "--steps", "2",
                             "--seed", "1"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out.png")
    assert "denoising" in result.stderr and "2/2" in result.stderr
    assert Image.open(tmp_path / "out.png").text["seed"] == "1"
