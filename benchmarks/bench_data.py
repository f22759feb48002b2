"""Speed of the shapes world and of the judge on one CPU core.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--samples 5000]

Prints samples/s of `ShapesDataset.__getitem__` (render + caption; the goal is ≥ 2,000/s,
so training never waits on data) and pictures/s of `minisd.shapes.evaluate.score`, and writes
them to benchmarks/results/bench_data.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from minisd.shapes.evaluate import score
from minisd.shapes.world import ShapesDataset

RESULTS = Path(__file__).resolve().parent / "results" / "bench_data.json"


def rate(fn, n: int, repeats: int = 3) -> float:
    """Best of `repeats` runs of fn(0 … n−1), in calls per second."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = ShapesDataset("train", num_samples=args.samples, seed=0)
    two = ShapesDataset("train", num_samples=args.samples, seed=0, two_object_fraction=1.0)
    test = ShapesDataset("test", num_samples=args.samples, seed=0)
    pictures = [(test[i][0], test.attributes(i)) for i in range(min(args.samples, 1000))]
    results = {
        "samples_per_s": rate(train.__getitem__, args.samples),
        "two_object_samples_per_s": rate(two.__getitem__, args.samples),
        "judge_pictures_per_s": rate(lambda i: score(*pictures[i]), len(pictures)),
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for key in ("samples_per_s", "two_object_samples_per_s", "judge_pictures_per_s"):
        print(f"{key:<26} {results[key]:>9,.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
