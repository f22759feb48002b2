"""`python -m minisd.training all` (minisd.training.stages) at tiny settings: the stages'
commands, a whole run into one folder that the pipeline loads, the log, a failed stage's
one-line message, and --resume skipping the stages already complete."""

import json
import shlex
import subprocess
import sys

import pytest
from tqdm import tqdm

from minisd.pipeline import StableDiffusionPipeline
from minisd.training.__main__ import main
from minisd.training.stages import AllConfig, last_losses, stage_commands
from minisd.training.stages import _last_bar as last_bar

TINY = {
    "vae_options": "--steps 2 --batch-size 4 --block-out-channels 8 16 --norm-num-groups 4 "
                   "--crop-size 16 --full-steps 1 --full-batch-size 4 --train-samples 16 "
                   "--scale-samples 8 --eval-samples 0 --checkpoint-every 1",
    "clip_options": "--steps 2 --batch-size 8 --vocab-captions 200 --hidden-size 16 "
                    "--num-hidden-layers 1 --num-attention-heads 2 --projection-dim 8 "
                    "--eval-images 0",
    "unet_options": "--steps 2 --batch-size 8 --block-out-channels 8 16 16 --train-samples 16",
}


def options(config: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]


def test_stage_commands():
    config = AllConfig(output="out", unet_launch="ddp", resume=True,
                       unet_options="--steps 5 --guidance-scale 3")
    commands = stage_commands(config)
    assert list(commands) == ["vae", "clip", "unet"]
    assert commands["vae"].argv == [sys.executable, "-m", "minisd.training", "vae",
                                    "--output", "out", "--out-dir", "out/checkpoints/vae",
                                    "--progress", "--resume"]
    assert (commands["vae"].threads, commands["clip"].threads) == (1, 1)
    unet = commands["unet"]
    assert unet.threads == 1 and unet.argv[1:6] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert unet.argv[-2:] == ["--guidance-scale", "3"]
    assert "--cache-dir out/checkpoints/unet-cache" in shlex.join(unet.argv)
    assert str(unet).startswith("OMP_NUM_THREADS=1 ")
    threads = stage_commands(AllConfig(unet_launch="threads", work_dir="w", progress=False))
    assert threads["unet"].threads == 2
    assert threads["unet"].argv[1:4] == ["-m", "minisd.training", "unet"]
    assert "--no-progress" in threads["unet"].argv and "--resume" not in threads["unet"].argv
    assert "w/unet" in threads["unet"].argv
    with pytest.raises(ValueError, match="--out-dir is set by `all`"):
        AllConfig(vae_options="--out-dir=x")
    with pytest.raises(ValueError, match="No closing quotation"):
        AllConfig(clip_options="--name 'x")
    with pytest.raises(ValueError, match="unet_launch must be one of ddp, threads"):
        AllConfig(unet_launch="mpi")


def test_progress_is_read_from_the_stage_output(tmp_path):
    """The bar drawn for a stage is the last tqdm bar in its output."""
    path = tmp_path / "stage.txt"
    with open(path, "w") as out:
        for total, desc in ((5, "vae"), (3, "vae (whole pictures)")):
            with tqdm(total=total, desc=desc, file=out, mininterval=0) as bar:
                bar.update(2)
                out.write("a warning\n")
                bar.update(0)
    assert last_bar(path) == ("vae (whole pictures)", 2, 3)
    path.write_text("nothing yet")
    assert last_bar(path) is None


def test_all_trains_the_whole_model_and_resumes_after_a_failure(tmp_path):
    output = tmp_path / "model"
    # The U-Net stage fails at run time: 8 training pictures are fewer than one batch of 16.
    failing = {**TINY, "unet_options": TINY["unet_options"].replace("--batch-size 8",
                                                                    "--batch-size 16")
               .replace("--train-samples 16", "--train-samples 8")}
    command = [sys.executable, "-m", "minisd.training", "all", "--output", str(output),
               "--no-progress", "--unet-launch", "threads", *options(failing)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 1
    work = output / "checkpoints"
    assert run.stderr.strip() == (
        "python -m minisd.training all: the unet stage failed (exit code 1): ValueError: the "
        "dataset has 8 samples, fewer than one batch of 16; lower batch_size or add data; its "
        f"output is in {work / 'unet.txt'}"), run.stderr
    assert (work / "vae.done").is_file() and (work / "clip.done").is_file()
    assert not (work / "unet.done").exists()

    # without --resume the run is refused; with it, vae and clip are skipped
    with pytest.raises(SystemExit, match="already holds a run; pass --resume to continue it"):
        main(command[3:])
    log_before = (output / "train.log").read_text()
    folder = main(["all", "--output", str(output), "--no-progress", "--unet-launch", "threads",
                   "--resume", *options(TINY)])
    assert folder == output and (work / "unet.done").is_file()

    log = (output / "train.log").read_text()[len(log_before):].splitlines()
    assert any("vae: skipped, complete" in line for line in log)
    assert any("clip: skipped, complete" in line for line in log)
    assert not any("vae: started" in line for line in log)
    started = next(line for line in log if "unet: started: " in line)
    assert started.split("unet: started: ", 1)[1] == str(stage_commands(
        AllConfig(output=str(output), unet_launch="threads", resume=True, progress=False,
                  **TINY))["unet"])
    done = next(line for line in log if "unet: done in " in line)
    assert " s wall, " in done and " s CPU; mean loss of the last 50 steps: unet " in done
    whole = (output / "train.log").read_text()
    assert "vae: done in" in whole and "vae/full" in whole and "clip: done in" in whole
    assert "unet: FAILED (exit code 1)" in whole

    assert set(last_losses(work / "vae")) == {"vae", "vae/full"}
    index = json.loads((output / "model_index.json").read_text())
    assert index["_sampling_defaults"]["guidance_scale"] == 2.5
    pipe = StableDiffusionPipeline.from_pretrained(output, device="cpu")
    images = pipe("a red circle", num_inference_steps=2, seed=0, output_type="pt",
                  progress=False).images
    assert images.shape == (1, 3, 64, 64)
