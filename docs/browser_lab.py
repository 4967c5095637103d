"""JupyterLab on 127.0.0.1 driven by Playwright with Debian's Chromium (no browser download):
start the server in a throw-away folder, open a notebook whose kernel is already running, wait
until that kernel is settled, Run All, check that every cell ran on that same kernel (once
more if not) and wait for what the caller expects on the page; then the studio's SST-2 notebook cell, and what
both sides do on the page: click a tab, choose in a dropdown, type into a box, find broken
pictures and error boxes, wait for a condition.

The server and its kernels run this interpreter (sys.executable), never `jupyter` or `python`
from PATH, and read JupyterLab's extensions from this interpreter's data folders (JUPYTER_PATH:
see data_paths), so a venv that is not on PATH works too.

Shared by docs/screenshots.py and the browser tests in tests/integration. It sits here rather
than under tests/ because the screenshot script is run from docs/, where this folder is on
sys.path; the tests get it from tests/conftest.py, which loads it by its path. Needs the
`jupyterlab` and `playwright` Python packages and /usr/bin/chromium (this module itself imports
neither).
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


def data_paths(env: dict) -> str:
    """JUPYTER_PATH for the server: what `env` already names, then share/jupyter under this
    interpreter's prefix and under the Python a venv was made from. Jupyter itself looks under
    sys.prefix only, so in a venv made with --system-site-packages the packages of the base
    Python import but their JupyterLab extensions (the widgets' manager among them) are not
    found, and widgets show as text."""
    found = [env.get("JUPYTER_PATH", ""), *(str(Path(p) / "share" / "jupyter") for p in (sys.prefix, sys.base_prefix))]
    return os.pathsep.join(dict.fromkeys(p for p in found if p))


def start_lab(root: Path, env: dict | None = None) -> Lab:
    """`jupyter lab` serving `root`, its settings and runtime files kept there too. `env`: the
    server's and its kernels' environment (default: this process's)."""
    port, token = free_port(), secrets.token_hex(16)
    env = os.environ if env is None else env
    env = env | {
        "TOKENIZERS_PARALLELISM": "false", "JUPYTER_PATH": data_paths(env),
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
    """Open `name` (a notebook under the lab's root) once its kernel is settled. The kernel is
    started through the server's API first, so the page attaches to it instead of asking which
    kernel to start."""
    request = urllib.request.Request(
        f"{lab.url}/api/sessions?token={lab.token}", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"path": name, "type": "notebook", "name": name, "kernel": {"name": "python3"}}).encode())
    urllib.request.urlopen(request, timeout=60)
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=60_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    wait_for_kernel(page, lab, time.monotonic() + 120)


def open_page(playwright, lab: Lab, nb: dict, viewport=(1400, 1000)):
    """(browser, page): `nb` saved as notebook.ipynb under the lab's root and open in a page, its
    kernel settled and nothing run yet."""
    (lab.root / "notebook.ipynb").write_text(json.dumps(nb))
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    open_notebook(page, lab, "notebook.ipynb")
    return browser, page


# The open notebook's path and kernel as the page sees them; the kernel's id only while the page
# is attached to it, it is connected and idle, and no start, restart, shutdown or change of
# kernel is under way.
PAGE_KERNEL = """() => {
  const panel = window.jupyterapp?.shell.currentWidget, sc = panel?.sessionContext, kernel = sc?.session?.kernel;
  const settled = !!(kernel && sc.isReady && !sc.hasNoKernel && !sc.isRestarting && !sc.isTerminating
    && !sc.pendingInput && kernel.status === 'idle' && kernel.connectionStatus === 'connected');
  return {path: panel?.context?.path || '', id: settled ? kernel.id : ''};
}"""
# Looks in a row (half a second apart) that must agree before a kernel counts as settled.
SETTLED_LOOKS = 4


def server_kernel(lab: Lab, path: str) -> str:
    """The id of the kernel the server runs for the notebook at `path`, where there is one
    session for it and its kernel is idle (not starting, restarting or dead); else ''."""
    with urllib.request.urlopen(f"{lab.url}/api/sessions?token={lab.token}", timeout=10) as answer:
        sessions = [s for s in json.load(answer) if s.get("path") == path]
    kernel = (sessions[0].get("kernel") or {}) if len(sessions) == 1 else {}
    return kernel.get("id", "") if kernel.get("execution_state") == "idle" else ""


def wait_for_kernel(page, lab: Lab, deadline: float) -> str:
    """Wait until the page and the server name the same idle kernel for the open notebook,
    SETTLED_LOOKS times in a row; its id. Run All given earlier can drop cells: JupyterLab asks
    which kernel to use for a cell run while the notebook has none, and choosing one there
    shuts the running kernel down and starts another, so later cells run on a kernel that has
    not seen the earlier ones. Such a question while nothing runs is answered with the default."""
    looks: list[str] = []
    while time.monotonic() < deadline:
        answer_dialog(page, accept=True)
        seen = page.evaluate(PAGE_KERNEL)
        kernel = seen["id"] if seen["id"] and seen["id"] == server_kernel(lab, seen["path"]) else ""
        looks = looks + [kernel] if kernel and looks[-1:] in ([], [kernel]) else [kernel] if kernel else []
        if len(looks) >= SETTLED_LOOKS:
            return kernel
        time.sleep(0.5)
    raise LabError(f"the notebook's kernel did not settle (the page sees {page.evaluate(PAGE_KERNEL)});"
                   f" lab log:\n{lab.log()}")


def answer_dialog(page, accept: bool) -> str:
    """Close a dialog JupyterLab shows, with its default button or by dismissing it; its text
    ('' when none is shown)."""
    dialog = page.locator(".jp-Dialog")
    if not dialog.count():
        return ""
    text = " ".join(dialog.first.inner_text().split())
    if accept:
        dialog.locator(".jp-mod-accept").first.click()
    else:
        page.keyboard.press("Escape")
    time.sleep(1)
    return text


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
    run, none is queued or running, and the kernel is idle. The kernel's own status, not the
    toolbar's indicator, which can stay on a kernel that restarted."""
    return page.evaluate(
        "(() => { const prompts = Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
        ".map(e => e.innerText);"
        " const idle = window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle';"
        " return idle && prompts.some(p => /\\[\\d+\\]/.test(p)) && !prompts.some(p => p.includes('[*]')); })()")


# The code cells that have not run (no execution count), by index among all cells, up to the
# first one left out after a cell that raised: JupyterLab stops Run All there, which is the
# error's doing, not a lost cell.
UNRUN = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.widgets.map((c, i) => ({i, m: c.model}))
    .filter(c => c.m.type === 'code');
  const raised = cells.findIndex(c => c.m.outputs.toJSON().some(o => o.output_type === 'error'));
  const unrun = cells.filter(c => c.m.executionCount === null);
  return raised >= 0 && unrun.length && cells.indexOf(unrun[0]) > raised ? [] : unrun.map(c => c.i);
}"""


# From here on, what befalls the open notebook's kernel and loses its state: a restart (asked
# for, or the server's after the kernel died), its death, another kernel in its place.
WATCH_KERNEL = """() => {
  const sc = window.jupyterapp.shell.currentWidget.sessionContext;
  window.nbftKernelEvents = [];
  if (sc.nbftWatched) return;
  sc.nbftWatched = true;
  sc.statusChanged.connect((_, status) => {
    if (['starting', 'restarting', 'autorestarting', 'dead'].includes(status)) window.nbftKernelEvents.push(status);
  });
  sc.kernelChanged.connect(() => window.nbftKernelEvents.push('another kernel'));
}"""


def run_cells(page, deadline: float) -> list[str]:
    """Run All, as a user would, until no cell is queued or running; what came up meanwhile:
    the kernel's losses (see WATCH_KERNEL) and dialogs, each dismissed (choosing a kernel
    there would change it mid-run)."""
    page.evaluate(WATCH_KERNEL)
    # Not awaited: the command's promise ends only when every cell has run.
    command = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
    page.evaluate(command)
    asked, dialogs = time.monotonic(), []
    # The first cell's imports can take minutes on a machine busy with other work; a Run All
    # that queued nothing is given again.
    while not all_ran(page) and time.monotonic() < deadline:
        if text := answer_dialog(page, accept=False):
            dialogs.append(f"dialog: {text}")
        elif time.monotonic() - asked > 15 and not cells_started(page):
            page.evaluate(command)
            asked = time.monotonic()
        time.sleep(0.5)
    return [f"kernel {event}" for event in page.evaluate("() => window.nbftKernelEvents")] + dialogs


def run_all(page, lab: Lab, ready, timeout: float = 300) -> None:
    """Once the notebook's kernel has settled, Run All until every cell has run, then wait for
    `ready()`. If a cell was left unrun or the kernel was lost meanwhile (see WATCH_KERNEL),
    Run All once more on a settled kernel; LabError naming what happened if it happens again,
    or if `ready()` never is."""
    deadline = time.monotonic() + timeout
    for attempt in (1, 2):
        kernel = wait_for_kernel(page, lab, deadline)
        events = run_cells(page, deadline)
        unrun = page.evaluate(UNRUN)
        if not unrun and not any(e.startswith("kernel") for e in events):
            break
        if attempt == 2 or time.monotonic() >= deadline:
            raise LabError(f"Run All {attempt} time(s) on kernel {kernel}: cells {unrun} did not run; "
                           f"meanwhile: {events or 'nothing'}; cells:\n{cells_state(page)}\nlab log:\n{lab.log()}")
    # Widgets are drawn a moment after their cell has run.
    if not wait_until(ready, 30, 0.5):
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
