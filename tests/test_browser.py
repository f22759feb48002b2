"""The course in a real browser: JupyterLab in headless Chromium, driven by Playwright.

For each notebook (a copy, so that autosave leaves the repository alone): open it as a reader
would and check that nothing changed on opening and that every widget shows its stored picture
rather than its repr; run every cell; then change every control of every widget and check that
its picture changes; and at the end, that the browser's console logged no errors.

Opt-in (`-m browser`; deselected otherwise) and skipped unless Playwright and a Chromium are
installed; no browser is ever downloaded:

    pip install -e ".[dev,browser]"            # Playwright, without its browsers
    apt-get install chromium                  # or set MINISD_CHROMIUM to a Chromium binary
    pytest -m browser tests/test_browser.py
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[browser]'")
CHROMIUM = os.environ.get("MINISD_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium: apt-get install chromium, or set MINISD_CHROMIUM",
                allow_module_level=True)

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT = 900          # seconds for a whole notebook to run in the browser's kernel
REDRAW_TIMEOUT = 120       # seconds for one widget to redraw after a change


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks, with its own settings and trust
    database; yields its base URL and token."""
    root = tmp_path_factory.mktemp("course")
    for path in NOTEBOOKS:
        shutil.copy(path, root / path.name)
    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)                    # draw every cell, not only those in view
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("JupyterLab did not start") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _wait_for(condition, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _all_cells_ran(page) -> bool:
    """Every code cell has an execution count, none is queued or running, the kernel idles."""
    return page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        const cells = panel.content.widgets.filter(c => c.model.type === 'code');
        const done = cells.every(c => c.model.executionCount !== null
                                      && !c.node.querySelector('.jp-InputPrompt').textContent.includes('*'));
        return done && panel.sessionContext.session.kernel.status === 'idle';
    }""")


def _widget_picture(widget) -> str:
    """The src of the picture a widget shows ('' while there is none)."""
    image = widget.locator(".widget-output img")
    return image.first.get_attribute("src") if image.count() else ""


def _controls(widget):
    """Each control of an interactive widget, with a way to change it."""
    changes = []
    for select in widget.locator("select").all():
        options = select.locator("option").all()
        chosen = select.input_value()
        other = next(o.get_attribute("value") for o in options if o.get_attribute("value") != chosen)
        changes.append(("dropdown", lambda s=select, v=other: s.select_option(v)))
    for box in widget.locator(".widget-text input[type='text']").all():
        changes.append(("text", lambda b=box: (b.fill("a large blue square on the right"),
                                               b.press("Enter"))))
    for box in widget.locator(".widget-text input[type='number']").all():
        changes.append(("number", lambda b=box: (b.fill("3"), b.press("Enter"))))
    for handle in widget.locator(".noUi-handle").all():
        changes.append(("slider", lambda h=handle: (h.focus(), h.press("ArrowRight"),
                                                    h.press("ArrowRight"))))
    return changes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_runs_and_every_control_redraws(lab, browser, path):
    url, token = lab
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    # a workspace of its own, reset: only this notebook is open, and it is the current one
    page.goto(f"{url}/lab/workspaces/{path.stem}/tree/{path.name}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    _wait_for(lambda: page.evaluate(
        "name => { const w = window.jupyterapp.shell.currentWidget;"
        " return w?.context?.path === name && w.sessionContext?.session?.kernel?.status === 'idle' }",
        path.name), 120, "the notebook and its kernel")

    # As opened: unchanged, every stored figure shown (a widget's too), no widget repr.
    assert page.locator(".jp-mod-dirty").count() == 0, "opening the notebook changed it"
    stored = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not [t for t in stored if re.search(r"interactive\(children=|IntSlider\(", t)]
    figures = sum("image/png" in output.get("data", {}) for cell in json.loads(path.read_text())["cells"]
                  for output in cell.get("outputs", []))
    assert page.locator(".jp-OutputArea-output img").count() == figures

    # Run every cell.
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    _wait_for(lambda: _all_cells_ran(page), RUN_TIMEOUT, f"{path.name} to run", every=2)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, tracebacks[0][:2000]

    # Change every control of every widget; the picture must change each time.
    widgets = page.locator(".widget-interact").all()
    for widget in widgets:
        widget.scroll_into_view_if_needed()
        _wait_for(lambda w=widget: _widget_picture(w), REDRAW_TIMEOUT, "the widget's picture")
        for kind, change in _controls(widget):
            before = _widget_picture(widget)
            change()
            _wait_for(lambda w=widget, b=before: _widget_picture(w) not in ("", b),
                      REDRAW_TIMEOUT, f"the picture to change after the {kind} changed")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    page.close()
    assert not problems, "\n".join(problems)
