"""The command line `python -m minisd`, on a tiny random model folder saved by minisd.

Every mistake is refused the way a user sees it, by running `python -m minisd`: exit status 2,
one line on stderr, no traceback, no picture written, nothing drawn."""

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from minisd import checkpoints, package_data
from minisd.__main__ import main
from minisd.pipeline import SamplingDefaults
from minisd.schedulers import SD_V1_SCHEDULER_CONFIG

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model on SD v1's DDIM settings (leading grid, steps_offset 1) that was judged,
    say, at guidance 3 with 2 steps."""
    pipe = tiny_pipeline("ddim")
    pipe.sampling_defaults = SamplingDefaults(guidance_scale=3.0, num_inference_steps=2)
    return pipe.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def minisd(*args) -> subprocess.CompletedProcess:
    """`python -m minisd *args` (str or bytes arguments) from the repository root."""
    return subprocess.run([sys.executable, "-m", "minisd", *args], capture_output=True,
                          text=True, errors="replace", cwd=ROOT, env=ENV, timeout=120,
                          check=False)


def assert_refused(result: subprocess.CompletedProcess, message: str, *unwritten: Path):
    """Exit 2 with exactly one line on stderr holding `message`, nothing on stdout, no
    traceback, no progress bar (nothing drawn) and none of the `unwritten` files."""
    assert_one_line(result.returncode, result.stdout, result.stderr, message, *unwritten)


def assert_one_line(status: int, out: str, err: str, message: str, *unwritten: Path):
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("minisd: error: "), err
    assert message in err, err
    assert "Traceback" not in err and "denoising" not in err and out == ""
    for path in unwritten:
        assert not path.exists(), path


def refused_in_process(capsys, argv: list[str], message: str, *unwritten: Path):
    """The same refusal through `main`, for the variants of a mistake a subprocess test
    already covers."""
    status = main(argv)
    captured = capsys.readouterr()
    assert_one_line(status, captured.out, captured.err, message, *unwritten)


# ---- what the command line refuses, before any drawing


def test_a_folder_that_cannot_be_written_is_refused_first(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        tempfile.NamedTemporaryFile(dir=locked).close()      # root writes anyway: use /sys
        locked = Path("/sys")
        tempfile.NamedTemporaryFile(dir=locked).close()
        pytest.skip("no folder here refuses new files")
    except OSError:
        pass
    result = minisd("a red circle", "--model", str(model), "-o", str(locked / "x.png"))
    assert_refused(result, f"-o/--output: cannot write into the folder '{locked}'",
                   locked / "x.png")


def test_an_output_that_is_a_folder_or_collides_with_the_numbering_is_refused(model, tmp_path,
                                                                              capsys):
    (tmp_path / "taken.png").mkdir()
    refused_in_process(capsys, ["a red circle", "--model", str(model), "-o",
                                str(tmp_path / "taken.png")], "is a folder; give a file name")
    refused_in_process(capsys, ["a red circle", "-o", str(tmp_path / "missing" / "x.png")],
                       "the folder", tmp_path / "missing")
    (tmp_path / "pic-1.png").mkdir()
    result = minisd("a red circle", "--model", str(model), "-o", str(tmp_path / "pic.png"),
                    "--n", "3")
    assert_refused(result, f"-o/--output '{tmp_path / 'pic.png'}' with --n 3 writes "
                           f"'{tmp_path / 'pic-1.png'}', which is a folder",
                   tmp_path / "pic-0.png", tmp_path / "pic-2.png")


def test_runs_that_cannot_fit_in_memory_are_refused_with_the_estimate(model, tmp_path, capsys):
    result = minisd("a red circle", "--model", str(model), "-o", str(tmp_path / "x.png"),
                    "--height", "1000000", "--width", "1000000")
    assert_refused(result, "1 picture(s) of 1000000×1000000 need at least", tmp_path / "x.png")
    assert re.search(r"need at least [\d,]+\.\d GiB \(the VAE decode at full size\), more "
                     r"than the [\d,]+\.\d GiB of cpu memory here", result.stderr)
    refused_in_process(capsys, ["a red circle", "--model", str(model), "-o",
                                str(tmp_path / "x.png"), "--n", "1000000000"],
                       "1000000000 picture(s) of 64×64 need at least", tmp_path / "x-0.png")


def test_a_size_that_is_not_a_multiple_of_the_vae_factor_is_refused_with_the_nearest(model,
                                                                                     tmp_path):
    result = minisd("a red circle", "--model", str(model), "-o", str(tmp_path / "x.png"),
                    "--height", "60")
    assert_refused(result, "--height 60 is not a multiple of 8 (the model's VAE factor); use "
                           "--height 56 or 64", tmp_path / "x.png")


def test_a_prompt_that_is_not_utf8_is_refused(model, tmp_path, capsys):
    """The shell hands over bytes; 0xff is no UTF-8 (it used to crash writing the PNG's
    metadata, after the drawing). Python passes such bytes on as lone surrogates (PEP 383)."""
    result = minisd(b"a red \xff circle", "--model", str(model), "-o", str(tmp_path / "x.png"))
    assert_refused(result, "the prompt is not valid UTF-8 (byte 0xff at character 6); pass the "
                           "text in UTF-8", tmp_path / "x.png")
    refused_in_process(capsys, ["a red circle", "--negative-prompt", "blue \udcfe", "--model",
                                str(model), "-o", str(tmp_path / "x.png")],
                       "the --negative-prompt is not valid UTF-8 (byte 0xfe at character 5)")


def test_a_model_option_that_names_no_model_says_what_it_takes(tmp_path):
    result = minisd("a red circle", "--model", "README.md", "-o", str(tmp_path / "x.png"))
    assert_refused(result, "--model README.md is a file that is not a model; --model takes a "
                           "model folder (with model_index.json), an SD v1 .safetensors or "
                           ".ckpt file, or a Hugging Face Hub id such as org/name")


class Opaque:
    """Something a pickle can hold that is not a tensor."""


def test_an_unreadable_ckpt_points_to_trust_pickle(tmp_path, capsys):
    """A .ckpt holding a Python object, and a plain pickle that is no PyTorch file: the advice
    is the option --trust-pickle, not PyTorch's or minisd's keyword arguments."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "thing": Opaque()}, path)
    result = minisd("a red circle", "--model", str(path), "-o", str(tmp_path / "x.png"))
    assert_refused(result, "holds Python objects besides tensors and numbers: "
                           "test_cli.Opaque", tmp_path / "x.png")
    assert "add --trust-pickle" in result.stderr and "trust_pickle=" not in result.stderr
    path.write_bytes(pickle.dumps({"w": [1, 2]}))
    refused_in_process(capsys, ["a red circle", "--model", str(path), "-o",
                                str(tmp_path / "x.png")],
                       "it is not a plain file of tensors, which is all minisd reads without "
                       "running code from it; if it comes from a source you trust, add "
                       "--trust-pickle")


def test_a_step_count_the_grid_cannot_give_is_refused_with_options_that_can(model, tmp_path):
    result = minisd("a red circle", "--model", str(model), "-o", str(tmp_path / "x.png"),
                    "--steps", "1000")
    assert_refused(result, "--num-inference-steps 1000 is more than the 999 steps the leading "
                           "grid with steps_offset 1 of DDIMScheduler can give; use "
                           "--num-inference-steps 999 or fewer, or --timestep-spacing linspace",
                   tmp_path / "x.png")


def test_img2img_options_are_checked_before_drawing(model, tmp_path, capsys):
    cat = str(package_data.sample_image("cat"))
    result = minisd("a red circle", "--model", str(model), "-o", str(tmp_path / "x.png"),
                    "--image", cat, "--strength", "0.5")
    assert_refused(result, "--image is 384×255 pixels (width×height); both must be multiples "
                           "of 8 (the model's VAE factor): add --height 64 --width 64 to "
                           "resize it to the size the model was trained at, or --height 256 "
                           "--width 384 to keep its size", tmp_path / "x.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    for options, message in [
            (["--image", "no-such-picture.png"], "--image: no sample image or file named"),
            (["--image", str(tmp_path / "notes.txt")], "notes.txt is not a picture Pillow can"),
            (["--image", cat, "--strength", "1.5"], "--strength must lie in [0, 1], got 1.5"),
            (["--strength", "0.5"], "--strength needs --image, the picture to start from"),
            (["--image", cat, "--height", "60"], "--height 60 is not a multiple of 8")]:
        refused_in_process(capsys, ["a red circle", "--model", str(model), "-o",
                                    str(tmp_path / "x.png"), *options], message)


def test_option_mistakes_take_one_line(tmp_path, capsys):
    assert_refused(minisd("a red circle", "-o", str(tmp_path / "x.png"), "--scheduler", "pndm"),
                   "argument --scheduler: invalid choice: 'pndm'")
    for options, message in [
            (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
            (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
            (["--n", "0"], "--n must be at least 1, got 0"),
            (["--threads", "0"], "--threads must be at least 1, got 0"),
            (["--height", "0"], "--height must be a positive number of pixels, got 0"),
            (["-o", "picture.jpg"], "-o/--output must be a .png file"),
            (["--device", "tpu"], "--device must be cpu, cuda (or cuda:N) or mps"),
            (["--num-inference-steps", "many"],
             "argument --num-inference-steps/--steps: invalid int value: 'many'")]:
        refused_in_process(capsys, ["a red circle", "-o", str(tmp_path / "x.png"), *options],
                           message)


# ---- what it draws


def test_draws_with_the_threads_it_is_given(model, tmp_path, monkeypatch):
    """One thread unless told otherwise (torch's own default is one per core)."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    for options in ([], ["--threads", "2"]):
        assert main(["a red circle", "-o", str(tmp_path / "x.png"), "--model", str(model),
                     "--num-inference-steps", "1", "--seed", "0", *options]) == 0
    assert calls == [1, 2]


def test_writes_pngs_with_their_settings(model, tmp_path, capsys):
    out = tmp_path / "pics" / "circle.png"
    out.parent.mkdir()
    status = main(["a red circle on the left", "-o", str(out), "--model", str(model),
                   "--num-inference-steps", "3", "--seed", "5", "--num-images-per-prompt", "2",
                   "--guidance-scale", "5", "--negative-prompt", "blue", "--scheduler", "euler",
                   "--device", "cpu", "--dtype", "float32", "--height", "64", "--width", "128"])
    assert status == 0
    paths = [tmp_path / "pics" / "circle-0.png", tmp_path / "pics" / "circle-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for i, path in enumerate(paths):
        image = Image.open(path)
        assert image.size == (128, 64)
        assert image.text == {"prompt": "a red circle on the left", "negative_prompt": "blue",
                              "num_inference_steps": "3", "guidance_scale": "5.0",
                              "scheduler": "euler", "timestep_spacing": "leading",
                              "model": str(model), "device": "cpu", "dtype": "float32",
                              "seed": str(5 + i), "size": "128x64", "software": "minisd"}
    # picture 1 was made with seed 6: that seed alone reproduces it (the short option names)
    again = tmp_path / "again.png"
    assert main(["a red circle on the left", "-o", str(again), "--model", str(model),
                 "--steps", "3", "--seed", "6", "--guidance", "5", "--negative", "blue",
                 "--scheduler", "euler", "--device", "cpu", "--height", "64",
                 "--width", "128", "--n", "1"]) == 0
    first, second = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], again))
    assert np.abs(first - second).max() <= 1     # equal up to the batch's float rounding


def test_defaults_come_from_the_model_and_the_seed_is_told(model, tmp_path, capsys):
    """No --steps, --guidance-scale or --seed: the model's 2 steps and guidance 3, and a drawn
    seed, printed so that --seed draws the picture again, and stored."""
    out = tmp_path / "a.png"
    assert main(["blue", "-o", str(out), "--model", str(model)]) == 0
    text = Image.open(out).text
    assert (text["num_inference_steps"], text["guidance_scale"]) == ("2", "3.0")
    assert (text["scheduler"], Image.open(out).size) == ("ddim", (64, 64))
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    seed = text["seed"]
    assert f"minisd: seed {seed} (--seed {seed} draws the same picture again)" in captured.err
    assert 0 <= int(seed) < 2 ** 31
    again = tmp_path / "b.png"
    assert main(["blue", "-o", str(again), "--model", str(model), "--seed", seed]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "minisd: seed" not in capsys.readouterr().err


def test_img2img_from_the_command_line(model, tmp_path, capsys):
    """--image and --strength: the picture's settings are stored; a strength with no step to
    run gives the picture back through the VAE, one with steps draws something else."""
    picture = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        picture)
    kept, edited = tmp_path / "kept.png", tmp_path / "edited.png"
    common = ["a red circle", "--model", str(model), "--image", str(picture), "--seed", "1",
              "--num-inference-steps", "4"]
    assert main([*common, "--strength", "0.1", "-o", str(kept)]) == 0
    assert main([*common, "--strength", "0.9", "-o", str(edited)]) == 0
    text = Image.open(edited).text
    assert (text["image"], text["strength"], text["size"]) == (str(picture), "0.9", "64x64")
    pipe = tiny_pipeline("ddim")
    through_vae = pipe.decode(pipe.vae.encode_latents(
        torch.from_numpy(np.asarray(Image.open(picture), dtype=np.float32)).permute(2, 0, 1)[None]
        / 127.5 - 1, torch.Generator().manual_seed(1)), "pil")[0]
    assert np.abs(np.asarray(Image.open(kept), dtype=np.int16)
                  - np.asarray(through_vae, dtype=np.int16)).max() <= 1
    assert np.abs(np.asarray(Image.open(kept), dtype=np.int16)
                  - np.asarray(Image.open(edited), dtype=np.int16)).max() > 10


def test_empty_long_and_non_ascii_prompts(model, tmp_path, capsys):
    """An empty prompt says it draws unconditionally; a 600-token prompt says in one short line
    that it was cut (no multi-kilobyte warning); any UTF-8 prompt is stored as given."""
    assert main(["", "-o", str(tmp_path / "e.png"), "--model", str(model), "--seed", "0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minisd")]
    assert notes == ["minisd: the prompt is empty: drawing without a prompt (unconditionally)"]
    assert main([" ".join(["red"] * 600), "-o", str(tmp_path / "l.png"), "--model", str(model),
                 "--seed", "0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minisd")]
    assert len(notes) == 1 and len(notes[0]) < 120, notes
    assert notes[0].startswith("minisd: the prompt is 600 tokens long; the model reads the "
                               "first 75, up to “…")
    prompt = "un cœur rouge ☺ à gauche"
    assert main([prompt, "-o", str(tmp_path / "u.png"), "--model", str(model), "--seed", "0"]) == 0
    assert Image.open(tmp_path / "u.png").text["prompt"] == prompt


def test_missing_bundled_model_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(package_data, "data_dir", lambda: tmp_path)
    assert main(["a red circle", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "minisd: error: the bundled model" in err and "python -m minisd.training all" in err
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_single_files_go_through_from_single_file(model, tmp_path, capsys):
    """A .safetensors --model is read as an SD v1 single file: this tiny one does not have SD
    v1's shapes, which the error says, on one line."""
    parts = checkpoints.load_pretrained(model)
    path = checkpoints.save_single_file(tmp_path / "tiny.safetensors", parts["unet"],
                                        parts["vae"], parts["text_encoder"])
    assert main(["x", "--model", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "model.diffusion_model." in err
    assert err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine "
                    "without CUDA")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["x", "--device", "cuda", "-o", str(tmp_path / "x.png")]) == 2
    assert "PyTorch sees no CUDA GPU here" in capsys.readouterr().err


def test_python_dash_m_runs_with_a_progress_bar(model, tmp_path):
    result = minisd("a red circle", "-o", str(tmp_path / "out.png"), "--model", str(model),
                    "--steps", "2", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out.png")
    assert "denoising" in result.stderr and "2/2" in result.stderr
    assert Image.open(tmp_path / "out.png").text["seed"] == "1"


def test_warnings_take_one_line_in_the_options_words(model, tmp_path, capsys):
    """SD v1.5's folder names PNDMScheduler, which minisd replaces: the warning says so on one
    line and points to --scheduler, not to the pipeline's keyword argument."""
    folder = tiny_pipeline().save_pretrained(tmp_path / "pndm")
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD_V1_SCHEDULER_CONFIG))
    assert main(["a red circle", "--model", str(folder), "--steps", "2", "--seed", "0",
                 "-o", str(tmp_path / "x.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minisd")]
    assert notes == [("minisd: warning: minisd has no PNDMScheduler; using "
                      "DPMSolverMultistepScheduler on the same noise schedule (pick another "
                      "with --scheduler, one of ddpm, ddim, euler, euler_ancestral, dpmpp_2m)")]
