"""JupyterLab on 127.0.0.1 driven by Playwright with Debian's Chromium (no browser download):
start the server in a throw-away folder, open a notebook whose kernel is already running, and
Run All until the page shows what the caller waits for; then the studio's SST-2 notebook cell,
and what both sides do on the page: click a tab, choose in a dropdown, type into a box, find
broken pictures and error boxes, wait for a condition.

Shared by docs/screenshots.py and the tests in tests/ui. It sits here rather than under tests/
because the screenshot script is run from docs/, where this folder is on sys.path; the tests get
it from tests/conftest.py, which loads it by its path. Needs the `jupyterlab` and `playwright`
Python packages and /usr/bin/chromium (this module itself imports neither).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Chromium's background services try the network at start; this machine refuses them.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# A tab's header (lumino's class; "p-" before JupyterLab 4).
TABS = ".lm-TabBar-tab, .p-TabBar-tab"
# The class nb_finetune.ui.common.message_html gives its red error box.
ERROR_BOX = ".nbft-error-box"
# Each picture shown under `el`: whether it has loaded, its own size, its size on the page, its classes.
PICTURES = ("el => Array.from(el.querySelectorAll('img')).filter(i => i.offsetParent !== null)"
            ".map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,"
            " shown_width: i.clientWidth, shown_height: i.clientHeight, cls: i.className}))")


class LabError(Exception):
    """JupyterLab, the kernel or the page did not get where it had to."""


@dataclass
class Lab:
    proc: subprocess.Popen
    url: str
    token: str
    root: Path

    def log(self) -> str:
        path = self.root / "lab.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def missing() -> str:
    """Why the browser cannot run here, or '' if it can."""
    if not Path(CHROMIUM).exists():
        return "Debian chromium is not installed (apt-get install chromium)"
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module} is not installed"
    return ""


def notebook(sources: list[str]) -> dict:
    """An nbformat 4 notebook of code cells, not yet run."""
    cells = [{"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {}, "outputs": [],
              "source": source} for i, source in enumerate(sources)]
    return {"cells": cells, "metadata": {"kernelspec": KERNELSPEC}, "nbformat": 4, "nbformat_minor": 5}


def sst2_studio_cell(config: dict, data: Path, show: str = "studio\n") -> str:
    """A cell making `studio = Studio(config, data=frame)` over 120 rows (60 of each label) of
    SST-2's `data` file, then running `show`."""
    return ("import csv\nimport pandas as pd\nfrom nb_finetune.ui import Studio\n"
            f"frame = pd.read_csv({str(data)!r}, sep='\\t', quoting=csv.QUOTE_NONE, dtype=str)\n"
            "frame = frame.groupby('label').head(60).reset_index(drop=True)\n"
            f"studio = Studio({config!r}, data=frame)\n" + show)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, env: dict | None = None) -> Lab:
    """`jupyter lab` serving `root`, its settings and runtime files kept there too. `env`: the
    server's and its kernels' environment (default: this process's)."""
    port, token = free_port(), secrets.token_hex(16)
    env = (os.environ if env is None else env) | {
        "TOKENIZERS_PARALLELISM": "false",
        "JUPYTER_CONFIG_DIR": str(root / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(root / "jupyter-runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / "lab-workspaces")}
    # No toasts: the news question would sit over the notebook's lower right corner.
    notification = root / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--ServerApp.allow_root=True"]
    with open(root / "lab.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    lab = Lab(proc, f"http://127.0.0.1:{port}", token, root)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=2)
            return lab
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_lab(lab)
                raise LabError("jupyter lab did not start:\n" + lab.log()) from None
            time.sleep(0.5)


def stop_lab(lab: Lab) -> None:
    lab.proc.terminate()
    try:
        lab.proc.wait(20)
    except subprocess.TimeoutExpired:
        lab.proc.kill()


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_notebook(page, lab: Lab, name: str) -> None:
    """Open `name` (a notebook under the lab's root) once its kernel is idle. The kernel is
    started through the server's API first, so the page attaches to it instead of asking which
    kernel to start."""
    request = urllib.request.Request(
        f"{lab.url}/api/sessions?token={lab.token}", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"path": name, "type": "notebook", "name": name, "kernel": {"name": "python3"}}).encode())
    urllib.request.urlopen(request, timeout=30)
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=60_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("document.querySelector('.jp-Notebook-ExecutionIndicator')"
                           "?.getAttribute('data-status') === 'idle'", timeout=90_000)


def open_page(playwright, lab: Lab, nb: dict, viewport=(1400, 1000)):
    """(browser, page): `nb` saved as notebook.ipynb under the lab's root and open in a page, its
    kernel idle and nothing run yet."""
    (lab.root / "notebook.ipynb").write_text(json.dumps(nb))
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    open_notebook(page, lab, "notebook.ipynb")
    return browser, page


def cells_started(page) -> bool:
    """Whether any cell is queued, running or has run: its prompt shows [*] or a number."""
    return page.evaluate("Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
                         ".some(e => /\\[(\\*|\\d+)\\]/.test(e.innerText))")


def cells_state(page) -> str:
    """Each cell's prompt and the start of its output, to say why a run did not get far."""
    return "\n".join(page.evaluate(
        "Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).map(c =>"
        " (c.querySelector('.jp-InputPrompt')?.innerText || '') + ' '"
        " + (c.querySelector('.jp-OutputArea')?.innerText || '').slice(0, 1500))"))


def all_ran(page) -> bool:
    """Whether Run All is over, every cell run or the rest dropped after an error: a cell has
    run, none is queued or running, and the kernel is idle."""
    return page.evaluate(
        "(() => { const prompts = Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
        ".map(e => e.innerText);"
        " const idle = document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status')"
        " === 'idle';"
        " return idle && prompts.some(p => /\\[\\d+\\]/.test(p)) && !prompts.some(p => p.includes('[*]')); })()")


def run_all(page, lab: Lab, ready, timeout: float = 300) -> None:
    """Run All, as a user would, until `ready()` is true; LabError if it never is."""
    # Not awaited: the command's promise ends only when every cell has run.
    command = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
    page.evaluate(command)
    # JupyterLab may ask which kernel to use the first time, or drop a Run All given while the
    # notebook is still attaching to its kernel; either way nothing runs. Answer the dialog with
    # the default, and run again while no cell has been queued. The first cell's imports can
    # take minutes on a machine busy with other work.
    deadline, asked = time.monotonic() + timeout, time.monotonic()
    while not ready() and time.monotonic() < deadline and not all_ran(page):
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
            time.sleep(2)
            page.evaluate(command)
            asked = time.monotonic()
        elif time.monotonic() - asked > 15 and not cells_started(page):
            page.evaluate(command)
            asked = time.monotonic()
        time.sleep(0.5)
    # Widgets are drawn a moment after their cell has run.
    drawn = min(deadline, time.monotonic() + 10)
    while not ready() and time.monotonic() < drawn:
        time.sleep(0.5)
    if not ready():
        raise LabError("the notebook did not get ready; cells:\n" + cells_state(page) + "\nlab log:\n" + lab.log())


def wait_until(check, timeout: float, interval: float = 0.3):
    """Call `check` until it answers something true and return that answer; after `timeout`
    seconds, its last (false) answer."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def click_tab(scope, title: str) -> None:
    """Click the tab headed `title` exactly (not one whose title only contains it)."""
    scope.locator(TABS).filter(has_text=re.compile(rf"^\s*{re.escape(title)}\s*$")).first.click()


def choose(scope, label: str, option: str) -> None:
    """Pick `option` in the shown dropdown labelled `label`."""
    named = scope.page.locator("label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    scope.locator(".widget-dropdown", has=named).locator("select").filter(visible=True).first.select_option(
        label=option)


def set_box(scope, label: str, value: str) -> None:
    """Type into the box labelled `label` and press Enter, which sends the value (the boxes
    do not send on each key)."""
    box = scope.locator(".widget-inline-hbox", has_text=label).locator("input, textarea").first
    box.wait_for(state="visible", timeout=30_000)
    box.fill(value)
    box.press("Enter")


def pictures(scope, timeout: float) -> list[dict]:
    """The pictures shown under `scope` (see PICTURES), once all have loaded or `timeout`
    seconds have passed; one loaded with no width is broken."""
    wait_until(lambda: all(i["complete"] for i in scope.evaluate(PICTURES)), timeout, 0.2)
    return scope.evaluate(PICTURES)


def error_boxes(scope):
    """The error boxes shown under `scope`: panels show an error in one, never as printed text."""
    return scope.locator(ERROR_BOX).filter(visible=True)


def full_width(page) -> None:
    """Put the file browser away, so that the notebook gets the window's width."""
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
