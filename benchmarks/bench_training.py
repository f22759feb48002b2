"""Speed of the bundled U-Net's training step on a CPU: how to spend two cores.

    python benchmarks/bench_training.py [--steps 30] [--rounds 3] [--busy 0] [--tiny]

Runs the U-Net recipe's training step (`minisd.training.unet`: its architecture, batch 64 of
16×16×4 latents with a 77×128 context, v-prediction loss, AdamW, EMA) through the shared loop
in three ways, alternated `--rounds` times:

- `1 process x 1 thread`  (OMP_NUM_THREADS=1),
- `1 process x 2 threads` (OMP_NUM_THREADS=2),
- `2 DDP processes x 1 thread` (torchrun --nproc_per_node=2, gloo; 32 samples each),

and prints the median seconds per step of each (after `--warmup` steps) and CPU seconds per
step. `--busy K` keeps K other processes spinning on the CPU meanwhile, as a machine shared
with other work: OpenMP threads spin-wait for each other, so two threads can lose far more
than half their speed when one of them is descheduled. Writes
benchmarks/results/bench_training.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from minisd.noise import NoiseSchedule
from minisd.training.loop import TrainConfig, init_distributed, train
from minisd.training.unet import LOSSES, UNetTrainConfig, unet_config
from minisd.unet import UNet2DConditionModel

RESULTS = Path(__file__).resolve().parent / "results" / "bench_training.json"
MODES = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2),
         "2 DDP processes x 1 thread": (2, 1)}


def worker(steps: int, warmup: int, batch_size: int, tiny: bool) -> None:
    """Train warmup + steps steps; rank 0 prints one JSON line {seconds per step, CPU s}."""
    recipe = UNetTrainConfig()
    if tiny:
        recipe = replace(recipe, block_out_channels=(8, 16, 16))
    g = torch.Generator().manual_seed(0)
    n = 4 * batch_size
    data = TensorDataset(torch.randn(n, 4, 16, 16, generator=g),
                         torch.randn(n, 77, 128, generator=g))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(unet_config(recipe, 128))
    loss = LOSSES[recipe.prediction_type](NoiseSchedule(**recipe.noise_schedule()),
                                          torch.zeros(77, 128), recipe.uncond_prob)
    stamps = []

    def timed(model, batch):
        stamps.append((time.perf_counter(), time.process_time()))
        return loss(model, batch)
    train(unet, timed, data, TrainConfig(steps=warmup + steps, batch_size=batch_size,
                                         ema_decay=0.999, progress=False, device="cpu"))
    stamps.append((time.perf_counter(), time.process_time()))
    wall = [b[0] - a[0] for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    cpu = (stamps[-1][1] - stamps[warmup][1]) / steps
    cpus = [None] * torch.distributed.get_world_size() if init_distributed().world_size > 1 \
        else [cpu]
    if len(cpus) > 1:
        torch.distributed.all_gather_object(cpus, cpu)
    if init_distributed().rank == 0:
        print(json.dumps({"seconds_per_step": statistics.median(wall),
                          "cpu_seconds_per_step": sum(cpus)}))


def run_mode(processes: int, threads: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    options = [__file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size)] + (["--tiny"] if args.tiny else [])
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}"]
    out = subprocess.run(launcher + options, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the modes")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes meanwhile")
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.batch_size, args.tiny)
        return
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    try:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, (processes, threads) in MODES.items():
                runs[mode].append(run_mode(processes, threads, args))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
               "busy_processes": args.busy, "batch_size": args.batch_size, "modes": {}}
    print(f"U-Net training step, batch {args.batch_size}, {args.busy} spinning processes:")
    for mode, values in runs.items():
        wall = statistics.median(v["seconds_per_step"] for v in values)
        cpu = statistics.median(v["cpu_seconds_per_step"] for v in values)
        results["modes"][mode] = {"seconds_per_step": wall, "cpu_seconds_per_step": cpu,
                                  "runs": values}
        print(f"  {mode:<28} {wall:.3f} s/step  ({cpu:.3f} CPU-s/step)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
