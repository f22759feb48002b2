"""Stored notebooks stay clean and reproducible, and open in JupyterLab as they were saved.

What a reader sees before running anything: every figure (a widget's included), no reprs,
addresses or paths, no errors; the file in the current format so that opening it changes
nothing; every chapter opening in plain words and a picture before its first formula."""

import base64
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
ABSOLUTE_PATH = re.compile(r"(/home/|/root/|/work/|/Users/|/tmp/|[A-Z]:\\\\Users)")
ADDRESS = re.compile(r"0x[0-9a-f]{6,}")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_REPR = re.compile(r"\b(interactive|VBox|HBox|IntSlider|FloatSlider|Dropdown|Text|Output)\(")
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
MAX_PNG_WIDTH = 900      # pixels: wider figures are shrunk to a JupyterLab output area, text too
FORMULA = re.compile(r"\$\$|\\frac|\\mathcal|\\sqrt|\\bar|\\hat")


def load(path):
    return json.loads(path.read_text())


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def widget_state(nb) -> dict:
    return nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def _outputs_text(outputs) -> str:
    parts = []
    for out in outputs:
        parts.append(json.dumps(out.get("text", "")))
        parts.append(json.dumps(out.get("data", {}).get("text/plain", "")))
        if out.get("output_type") == "error":
            parts.append("ERROR " + out.get("ename", ""))
    return "\n".join(parts)


def png_width(data: str) -> int:
    return int.from_bytes(base64.b64decode(data)[16:20], "big")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_in_the_format_jupyterlab_writes(path):
    """nbformat 4.5 with a valid, unique id per cell and ipykernel's own kernelspec: opening
    the notebook in JupyterLab then changes nothing (no 'unsaved changes' dot)."""
    nb = load(path)
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5), "store as nbformat 4.5 (cell ids)"
    ids = [c.get("id", "") for c in nb["cells"]]
    assert all(CELL_ID.match(i) for i in ids), "every cell needs an id of letters, digits, - or _"
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    assert nb["metadata"]["kernelspec"] == {"display_name": "Python 3 (ipykernel)",
                                            "language": "python", "name": "python3"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order_with_clean_outputs(path):
    nb = load(path)
    code = code_cells(nb)
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "not executed top to bottom in one run"
    for cell in code:
        text = _outputs_text(cell.get("outputs", []))
        source = "".join(cell["source"])[:60]
        assert "ERROR" not in text, f"stored error output in cell {source!r}"
        assert "<Figure size" not in text, f"figure repr left as a result in {source!r}"
        assert not ADDRESS.search(text), f"memory address stored in {source!r}"
        assert not ABSOLUTE_PATH.search(text), f"an absolute path is stored in {source!r}"
        shows_progress = any(o.get("name") == "stderr" and "it/s" in "".join(o.get("text", ""))
                             for o in cell.get("outputs", []))
        if shows_progress:
            assert "nbval-ignore-output" in cell["metadata"].get("tags", []), \
                f"a cell with a progress bar must be tagged nbval-ignore-output: {source!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_widget_is_stored_with_its_picture_and_state(path):
    """A reader who opens the notebook sees a picture where each widget is: JupyterLab shows
    the PNG in an untrusted notebook and the widget, from its stored state, in a trusted one;
    never the widget's repr text."""
    nb = load(path)
    state = widget_state(nb)
    views = 0
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert not WIDGET_REPR.search("".join(data.get("text/plain", ""))), \
                f"widget repr text stored in {''.join(cell['source'])[:60]!r}"
            if WIDGET_VIEW in data:
                views += 1
                assert "image/png" in data, "a widget output without the picture standing in for it"
                assert data[WIDGET_VIEW]["model_id"] in state, "a widget stored without its state"
    for model in state.values():                       # figures inside stored Output widgets
        text = _outputs_text(model.get("state", {}).get("outputs", []))
        assert "<Figure size" not in text and not ADDRESS.search(text)
    if not views:
        assert not state, "widget state stored, but no widget shown"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figures_fit_the_notebook_width(path):
    nb = load(path)
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                assert png_width(png) <= MAX_PNG_WIDTH, \
                    f"a {png_width(png)} px wide figure in {''.join(cell['source'])[:60]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_chapter_opens_in_plain_words_and_a_picture(path):
    """The first cell is words without formulas, and a picture comes before the first
    formula of the chapter."""
    cells = load(path)["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert not FORMULA.search("".join(cells[0]["source"])), "the opening words hold a formula"
    first_formula = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                         and FORMULA.search("".join(c["source"])))
    first_picture = next(i for i, c in enumerate(cells)
                         if any("image/png" in o.get("data", {}) for o in c.get("outputs", [])))
    assert first_picture < first_formula


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_private_case_numbers(path):
    """The field cases are the project's own list; a reader does not have it."""
    text = "".join("".join(c["source"]) for c in load(path)["cells"])
    assert not re.search(r"\bcase C?\d\d\b|\(case\)", text)
