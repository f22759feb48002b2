"""Stored notebook outputs stay clean and reproducible."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
ABSOLUTE_PATH = re.compile(r"(/home/|/root/|/work/|/Users/|/tmp/|[A-Z]:\\\\Users)")


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(json.dumps(out.get("text", "")))
        parts.append(json.dumps(out.get("data", {}).get("text/plain", "")))
        if out.get("output_type") == "error":
            parts.append("ERROR " + out.get("ename", ""))
    return "\n".join(parts)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"], "widget state is stored; strip metadata.widgets"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "not executed top to bottom in one run"
    for cell in code:
        text = _outputs_text(cell)
        source = "".join(cell["source"])[:60]
        assert "ERROR" not in text, f"stored error output in cell {source!r}"
        assert "<Figure size" not in text, f"figure repr left as a result in {source!r}"
        assert not re.search(r"0x[0-9a-f]{6,}", text), f"memory address stored in {source!r}"
        assert not ABSOLUTE_PATH.search(text), f"an absolute path is stored in {source!r}"
        shows_progress = any(o.get("name") == "stderr" and "it/s" in "".join(o.get("text", ""))
                             for o in cell.get("outputs", []))
        if shows_progress:
            assert "nbval-ignore-output" in cell["metadata"].get("tags", []), \
                f"a cell with a progress bar must be tagged nbval-ignore-output: {source!r}"
