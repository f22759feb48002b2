"""`python -m minisd.training all`: the whole bundled model, trained end to end by one command.

    python -m minisd.training all                        # into runs/minisd-shapes
    python -m minisd.training all --resume               # after an interruption
    python -m minisd.training all --output data/minisd-shapes --work-dir runs/minisd-shapes-work

Three stages, each `python -m minisd.training <stage>` with its own defaults in a process
of its own (`stage_commands`), all writing into one model folder `output`:

1. `vae` and `clip` at once: they do not depend on each other, so on a 2-core machine they
   run as two processes of one thread each (OMP_NUM_THREADS=1), one per core;
2. then `unet`, which reads the VAE, the text encoder and the tokenizer from `output`,
   as two DDP processes of one thread each (torchrun, gloo; `unet_launch="ddp"`) or as one
   process of two threads (`"threads"`). DDP is the default: as fast on an idle machine, and
   on a shared one two OpenMP threads were measured 10× slower than one while two processes
   were not slowed (the measurements are in `minisd.training.unet`).

Everything a run leaves besides the model goes to `work_dir` (default `<output>/checkpoints`):
each stage's checkpoints (`<work_dir>/<stage>/`), the U-Net's encoded training set, each
stage's whole output (`<stage>.txt`, progress bars included, read back here to draw one bar
per stage) and, when a stage has completed, `<stage>.done`. `output/train.log` records the
run: each stage's exact command, its start and end, wall and CPU seconds, and the mean loss
of its last 50 steps (read from its last checkpoint).

`resume` skips the stages already complete and continues the others from their latest
checkpoints. A stage that fails stops the run (a stage running beside it is stopped too; its
checkpoints stay for `--resume`) with `TrainingFailed`, which the command line turns into one
line naming the stage, its last words and its output file, and a non-zero exit.
"""

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from minisd.training.loop import latest_checkpoint

LAUNCHES = ("ddp", "threads")
# the options `all` sets for every stage; a stage's extra options may not set them
MANAGED_OPTIONS = ("--output", "--out-dir", "--model", "--cache-dir", "--resume", "--no-resume",
                   "--progress", "--no-progress")
LOG_NAME = "train.log"
STAGES = ("vae", "clip", "unet")


class TrainingFailed(RuntimeError):
    """`all` could not run or complete; the message says why in one line."""


@dataclass
class AllConfig:
    """The settings of `python -m minisd.training all`, each also a command-line option.
    The stages' own settings are their recipes' defaults, changed through
    `vae_options`, `clip_options` and `unet_options` (e.g. "--steps 100").

    Raises ValueError naming the field for an unknown launch, unbalanced quotes, or an
    extra option that `all` sets itself.
    """

    output: str = field(default="runs/minisd-shapes", metadata={
        "help": "the model folder to write (diffusers layout); train.log in it records the run"})
    work_dir: str | None = field(default=None, metadata={
        "help": "checkpoints, caches and each stage's output ('none': <output>/checkpoints)"})
    resume: bool = field(default=False, metadata={
        "help": "skip complete stages and continue the others from their checkpoints"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per stage"})
    unet_launch: str = field(default="ddp", metadata={
        "help": "the U-Net stage on two cores: two DDP processes of one thread each, or one "
                "process of two threads", "choices": LAUNCHES})
    vae_options: str = field(default="", metadata={
        "help": "more options for the vae stage, e.g. '--steps 100' "
                "(python -m minisd.training vae --help)"})
    clip_options: str = field(default="", metadata={"help": "more options for the clip stage"})
    unet_options: str = field(default="", metadata={"help": "more options for the unet stage"})

    def __post_init__(self):
        if self.unet_launch not in LAUNCHES:
            raise ValueError(f"AllConfig.unet_launch must be one of {', '.join(LAUNCHES)}, "
                             f"got {self.unet_launch!r}")
        for stage in STAGES:
            name = f"{stage}_options"
            try:
                words = shlex.split(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"AllConfig.{name}: {e} in {getattr(self, name)!r}") from None
            taken = [w.split("=")[0] for w in words if w.split("=")[0] in MANAGED_OPTIONS]
            if taken:
                raise ValueError(f"AllConfig.{name}: {taken[0]} is set by `all` for every "
                                 f"stage; use all's --output, --work-dir, --resume, --progress")

    @property
    def work(self) -> Path:
        """The folder of checkpoints, caches and stage outputs: `work_dir` or
        `<output>/checkpoints`."""
        return Path(self.work_dir) if self.work_dir is not None else Path(self.output) / "checkpoints"


@dataclass
class StageCommand:
    """One stage's process: `argv` run with the environment's `threads` (OMP_NUM_THREADS)."""

    stage: str
    argv: list[str]
    threads: int

    def __str__(self) -> str:
        return f"OMP_NUM_THREADS={self.threads} {shlex.join(self.argv)}"


def stage_commands(config: AllConfig) -> dict[str, StageCommand]:
    """The command of each stage: `python -m minisd.training <stage>` with `--output`, its
    checkpoints in `<work_dir>/<stage>`, `--resume` and `--progress` as `config` says, then
    the stage's extra options; the U-Net under torchrun for `unet_launch="ddp"`."""
    commands = {}
    for stage in STAGES:
        argv = [stage, "--output", config.output, "--out-dir", str(config.work / stage),
                "--progress" if config.progress else "--no-progress"]
        if stage == "unet":
            argv += ["--cache-dir", str(config.work / "unet-cache")]
        if config.resume:
            argv.append("--resume")
        argv += shlex.split(getattr(config, f"{stage}_options"))
        launcher, threads = [sys.executable, "-m"], 1
        if stage == "unet" and config.unet_launch == "ddp":
            launcher += ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
        elif stage == "unet":
            threads = 2
        commands[stage] = StageCommand(stage, [*launcher, "minisd.training", *argv], threads)
    return commands


def _log(config: AllConfig, line: str, show: bool = False) -> None:
    """Append `line` to the run's log with the time; with `show` (and `progress`) also print it
    above the progress bars."""
    with open(Path(config.output) / LOG_NAME, "a", encoding="utf-8") as log:
        log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S}  {line}\n")
    if show and config.progress:
        tqdm.write(line)


# tqdm's text: "<desc>:  37%|███▋      | 370/1000 [00:10<00:20, ...]"
_BAR = re.compile(r"^(?P<desc>.*?): *\d+%\|.*?\| *(?P<n>\d+)/(?P<total>\d+) \[")


def _last_bar(path: Path) -> tuple[str, int, int] | None:
    """(description, steps done, steps in all) of the last progress bar in a stage's output."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        tail = f.read().decode("utf-8", errors="replace")
    for segment in reversed(re.split(r"[\r\n]", tail)):
        match = _BAR.match(segment.strip())
        if match:
            return match["desc"], int(match["n"]), int(match["total"])
    return None


def _last_words(path: Path) -> str:
    """The last line of a stage's output that is not a progress bar (an error's message)."""
    lines = [s.strip() for s in re.split(r"[\r\n]", path.read_text(errors="replace"))]
    lines = [s for s in lines if s and not _BAR.match(s)]
    return lines[-1] if lines else "(no output)"


def last_losses(folder: Path, n: int = 50) -> dict[str, float]:
    """The mean loss of the last `n` steps of each training phase under `folder` (its latest
    checkpoint's history; the VAE's whole-picture phase is `<folder>/full`), by phase."""
    found = {}
    for phase in (folder, *sorted(p for p in folder.glob("*") if p.is_dir()
                                  and not p.name.startswith("checkpoint-"))):
        checkpoint = latest_checkpoint(phase)
        if checkpoint is not None:
            losses = torch.load(checkpoint / "state.pt", map_location="cpu",
                                weights_only=True)["history"]["loss"][-n:]
            found[phase.relative_to(folder.parent).as_posix()] = sum(losses) / len(losses)
    return found


@dataclass
class _Running:
    command: StageCommand
    process: subprocess.Popen
    output: Path
    start: float
    bar: tqdm


def _start(command: StageCommand, config: AllConfig, position: int) -> _Running:
    output = config.work / f"{command.stage}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(command.threads), "PYTHONUNBUFFERED": "1",
           "TQDM_MININTERVAL": "1"}
    with open(output, "ab") as out:
        out.write(f"\n==== {datetime.now():%Y-%m-%d %H:%M:%S}  {command}\n".encode())
        out.flush()
        process = subprocess.Popen(command.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
    _log(config, f"{command.stage}: started: {command}")
    bar = tqdm(total=1, desc=command.stage, position=position, disable=not config.progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}]",
               dynamic_ncols=True)
    return _Running(command, process, output, time.perf_counter(), bar)


def _stop(running: _Running) -> None:
    running.process.terminate()
    running.process.wait()
    running.bar.close()


def _run_together(commands: list[StageCommand], config: AllConfig) -> None:
    """Run the stages of `commands` at once; log each one's end; on a failure stop the others
    and raise TrainingFailed."""
    running = [_start(c, config, i) for i, c in enumerate(commands)]
    try:
        while running:
            time.sleep(0.5)
            for r in list(running):
                pid, status, usage = os.wait4(r.process.pid, os.WNOHANG)
                if pid == 0:
                    bar = _last_bar(r.output)
                    if bar is not None:
                        desc, r.bar.n, r.bar.total = bar
                        stage = r.command.stage
                        r.bar.set_description_str(desc if desc.startswith(stage)
                                                  else f"{stage}: {desc}")
                    continue
                r.process.returncode = code = os.waitstatus_to_exitcode(status)
                running.remove(r)
                r.bar.close()
                wall, cpu = time.perf_counter() - r.start, usage.ru_utime + usage.ru_stime
                stage = r.command.stage
                if code != 0:
                    _log(config, f"{stage}: FAILED (exit code {code}) after {wall:.1f} s wall, "
                                 f"{cpu:.1f} s CPU; output: {r.output}", show=True)
                    raise TrainingFailed(f"the {stage} stage failed (exit code {code}): "
                                         f"{_last_words(r.output)}; its output is in {r.output}")
                losses = ", ".join(f"{k} {v:.4g}" for k, v in
                                   last_losses(config.work / stage).items())
                _log(config, f"{stage}: done in {wall:.1f} s wall, {cpu:.1f} s CPU; mean loss of "
                             f"the last 50 steps: {losses or 'no checkpoint'}", show=True)
                (config.work / f"{stage}.done").write_text(f"{r.command}\n")
    finally:
        for r in running:
            _stop(r)
            _log(config, f"{r.command.stage}: stopped; --resume continues it", show=True)


def run_all(config: AllConfig) -> Path:
    """Train the whole bundled model into `config.output` (module docstring). Returns the
    model folder. Raises TrainingFailed when `work_dir` holds a run and `resume` is False,
    or when a stage fails."""
    work = config.work
    if not config.resume and work.is_dir() and any(work.iterdir()):
        raise TrainingFailed(f"{work} already holds a run; pass --resume to continue it, or "
                             f"choose another --output (or --work-dir)")
    work.mkdir(parents=True, exist_ok=True)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    commands = stage_commands(config)
    start = time.perf_counter()
    _log(config, f"all: {config} (python {sys.version.split()[0]}, torch {torch.__version__}, "
                 f"{os.cpu_count()} CPUs)")
    for group in (("vae", "clip"), ("unet",)):
        todo = []
        for stage in group:
            if (work / f"{stage}.done").is_file():
                _log(config, f"{stage}: skipped, complete ({work / f'{stage}.done'})", show=True)
            else:
                todo.append(commands[stage])
        if todo:
            _run_together(todo, config)
    minutes = (time.perf_counter() - start) / 60
    _log(config, f"all: done in {minutes:.1f} min; the model is in {config.output} (this log: "
                 f"{Path(config.output) / LOG_NAME})", show=True)
    return Path(config.output)
