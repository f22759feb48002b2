"""Re-execute course notebooks top to bottom and store them the way they are committed.

    OMP_NUM_THREADS=1 python notebooks/execute.py [notebooks/NN_name.ipynb ...]   (default: all)

Each notebook runs in one fresh kernel (nbclient, the engine nbval uses too) and is written back
in nbformat 4.5 with a stable id per cell, with its outputs and with the state of its widgets in
the notebook's metadata, so that a reader who opens it in JupyterLab sees every figure, the
widgets' pictures included, and opening it changes nothing (ipykernel's own kernelspec, too).
Per-run noise is left out: no timing metadata, and figures keep their pictures without
matplotlib's `<Figure size …>` text. Stops at the first cell that raises.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _drop_figure_reprs(nb) -> None:
    """Drop the `<Figure size …>` text that matplotlib stores beside each picture, in the cells'
    outputs and in the outputs kept inside Output widgets (the picture stays)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    outputs += [o for model in state.values() for o in model.get("state", {}).get("outputs", [])]
    for output in outputs:
        data = output.get("data", {})
        if "image/png" in data and str(data.get("text/plain", "")).startswith("<Figure size"):
            del data["text/plain"]


def execute(path: Path, timeout: int = 600) -> float:
    """Run the notebook at `path` in place; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    nb.nbformat, nb.nbformat_minor = 4, 5
    for index, cell in enumerate(nb.cells):
        cell.setdefault("id", f"{path.stem[:2]}-{index:02d}")
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.kernelspec = KERNELSPEC
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            record_timing=False, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    _drop_figure_reprs(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
