"""Course time: how long `pytest notebooks/` (every notebook through nbval) takes.

    python benchmarks/bench_course.py [--tiny] [--threads N]

Runs pytest once, in a subprocess, from the repository root with the project's own options
(pyproject.toml), the way CI runs the course; reports the wall time of the whole run and the
time of each notebook (the sum of its cells, from pytest's JUnit XML). One run: the course
takes minutes, and it is a total, not a comparison. --tiny times a one-cell notebook in a
temporary folder instead (the smoke test). Exits with pytest's status when a notebook fails.
Writes benchmarks/results/course.json.
"""

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import nbformat
import timing

ROOT = Path(__file__).resolve().parent.parent


def tiny_notebook(folder: Path) -> Path:
    """A notebook with one cell that prints a number (and whose stored output matches)."""
    cell = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(6 * 7)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    cell.execution_count = 1
    path = folder / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return folder


def per_notebook(junit: Path) -> dict[str, float]:
    """Seconds per notebook file: the sum of its test cases' times in a JUnit XML report."""
    seconds = defaultdict(float)
    for case in ET.parse(junit).iter("testcase"):
        notebook = case.get("file") or case.get("classname", "").split("::")[0]
        seconds[Path(notebook).name] += float(case.get("time", 0))
    return dict(sorted(seconds.items()))


def main(argv=None):
    args = timing.parse(timing.parser("course", __doc__.splitlines()[0]), argv)
    with tempfile.TemporaryDirectory(prefix="minisd-course-") as work:
        work = Path(work)
        target = tiny_notebook(work) if args.tiny else ROOT / "notebooks"
        junit = work / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
                   "--rootdir", str(ROOT), "-p", "no:cacheprovider", "-q",
                   f"--junitxml={junit}", "-o", "junit_family=xunit1", str(target)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  check=False)
        seconds = time.perf_counter() - start
        notebooks = per_notebook(junit) if junit.is_file() else {}
    summary_line = (finished.stdout.strip().splitlines() or [""])[-1]
    rows = [{"notebook": name, "seconds": s} for name, s in notebooks.items()]
    rows.append({"notebook": "whole run (wall, with start-up)", "seconds": seconds})
    payload = {"benchmark": "course", "command": " ".join(command[1:]),
               "tiny": args.tiny, "seconds": seconds, "notebooks": notebooks,
               "pytest_status": finished.returncode, "pytest_summary": summary_line,
               "load_before": load_before, "load_after": os.getloadavg()[0],
               **timing.environment()}
    print(timing.table(rows, [("notebook", "notebook"), ("seconds", "seconds")]))
    print(f"pytest: {summary_line} (exit status {finished.returncode}); "
          f"load {load_before:.2f}→{payload['load_after']:.2f}")
    timing.write(args.out, payload)
    if finished.returncode:
        print(finished.stdout[-3000:], finished.stderr[-2000:], sep="\n", file=sys.stderr)
        sys.exit(finished.returncode)


if __name__ == "__main__":
    main()
