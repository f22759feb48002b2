"""What every benchmark shares: timing minisd against its reference, the command line, the
table and the JSON.

`compare(ours, reference)` times two zero-argument callables in the same process: `warmup`
calls of each first (not timed), then `runs` timed calls of each, alternating (ours, ref,
ref, ours, ours, ref, …) so that a machine that speeds up or slows down during the run
(turbo, other jobs) weighs on both equally. It reports the median, min and max seconds of
each and the ratio minisd / reference of the medians: below 1 means minisd is faster.

Every script takes the same options (`parser`): --tiny (a tiny configuration that runs in
seconds, for the smoke test), --runs (≥ 3), --warmup, --threads (default: one per core) and
--out (default benchmarks/results/<name>.json). The JSON holds the figures, the per-run
times, and where they were measured: machine, threads, library versions and the 1-minute
load average before and after (the machine may be shared).
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def summary(times: list[float]) -> dict:
    """Seconds of a list of runs → {"median", "min", "max", "runs"}."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "runs": times}


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall-clock seconds of one call of `fn`; `sync` (e.g. torch.cuda.synchronize) is
    called before starting and before stopping the clock, for asynchronous devices."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def compare(ours: Callable[[], object], reference: Callable[[], object], runs: int = 3,
            warmup: int = 1, sync: Callable[[], None] | None = None) -> dict:
    """Time minisd's `ours` against `reference`, alternating (see the module docstring).

    Returns {"minisd": summary, "reference": summary, "ratio": median ours / median ref,
    "load_before", "load_after"} (1-minute load averages). Raises ValueError for runs < 3.
    """
    if runs < 3:
        raise ValueError(f"runs={runs}: a median needs at least 3 runs")
    load_before = os.getloadavg()[0]
    for _ in range(warmup):
        ours()
        reference()
    times = {"minisd": [], "reference": []}
    pairs = [("minisd", ours), ("reference", reference)]
    for i in range(runs):
        for name, fn in (pairs if i % 2 == 0 else pairs[::-1]):
            times[name].append(timed(fn, sync))
    ours_s, ref_s = summary(times["minisd"]), summary(times["reference"])
    return {"minisd": ours_s, "reference": ref_s, "ratio": ours_s["median"] / ref_s["median"],
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ours − reference‖ / ‖reference‖ (Frobenius norms, in float32)."""
    ours, reference = ours.float(), reference.float()
    return ((ours - reference).norm() / reference.norm()).item()


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; `name` gives the default JSON file."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="a tiny configuration that runs in seconds (the smoke test)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each (≥ 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each first")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: one per core)")
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                   help="where the JSON goes")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, check --runs, and set torch's thread count."""
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error(f"--runs {args.runs}: the median needs at least 3 runs")
    torch.set_num_threads(args.threads)
    return args


def environment() -> dict:
    """Where the figures were measured: machine, threads, versions, date."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for library in ("diffusers", "transformers"):
        try:
            versions[library] = __import__(library).__version__
        except ImportError:
            versions[library] = None
    return {"machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores, {platform.system()}",
            "threads": torch.get_num_threads(), **versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: `columns` are (key in each row, heading); floats get 3
    significant figures."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    cells = [[heading for _, heading in columns]] + [[cell(row.get(key)) for key, _ in columns]
                                                       for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


COMPARISON_COLUMNS = [("case", "case"), ("minisd_s", "minisd s (median)"),
                      ("minisd_range", "min–max"), ("reference_s", "reference s"),
                      ("reference_range", "min–max"), ("ratio", "minisd/ref"),
                      ("load", "load 1-min")]


def comparison_row(case: str, result: dict) -> dict:
    """One printed row of a `compare` result."""
    ours, ref = result["minisd"], result["reference"]
    return {"case": case, "minisd_s": ours["median"],
            "minisd_range": f"{ours['min']:.3g}–{ours['max']:.3g}",
            "reference_s": ref["median"], "reference_range": f"{ref['min']:.3g}–{ref['max']:.3g}",
            "ratio": result["ratio"],
            "load": f"{result['load_before']:.2f}→{result['load_after']:.2f}"}


def write(path: Path, payload: dict) -> None:
    """Write the JSON (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {path}")
