"""Screenshots of the studio as a person sees it in JupyterLab, for the documentation.

Starts `jupyter lab` on 127.0.0.1 (a token, a free port, a throw-away folder), writes a
notebook that shows `Studio(config, data=frame)` over 120 SST-2 rows with a tiny, fast
configuration (SmolLM2-135M-Instruct, 12 steps), and drives it with Playwright and Debian's
Chromium as the browser test does: load the data, look at the model, train, let the
evaluation run, and run a small bias probe. Each picture is of the studio's output area only:

    studio.png    the Data tab after "Load and check" (what a user sees first)
    model.png     the Model tab: settings, trainable parameters, memory estimate
    train.png     the Train tab mid-run, the live plot showing the first logged steps
    evaluate.png  the Evaluate tab after the evaluation that follows training
    probe.png     the Bias probe tab after a 40-pair CrowS-Pairs probe

Run from anywhere (this checkout's package is the one imported):

    python docs/screenshots.py [--data PATH] [--out docs/images]

`--data` is SST-2's dev.tsv (default: ../shared/data/sst2/dev.tsv beside the repository);
`--out` the folder for the PNGs (default: docs/images in the repository). Needs the
`jupyterlab` and `playwright` Python packages and `/usr/bin/chromium` (apt-get install
chromium); the model and the CrowS-Pairs set come from nb_finetune's asset cache.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Chromium's background services try the network at start; this machine refuses them.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 900}
MAX_BYTES = 200_000  # a larger PNG is scaled down
PROBE_PAIRS = 40
# Generous: on a 2-core machine shared with other jobs, training runs several times slower.
TRAIN_TIMEOUT = 900


class Failure(Exception):
    """Something the pictures need never appeared."""


def config(output_dir: Path) -> dict:
    """The demo model on a tiny run: a few steps, a short test, two samples. SmolLM2's chat
    template and the instruction take about 50 tokens, so max_length 96 cuts no sentence."""
    return {"data": {"task": "classification", "text_column": "sentence",
                     "label_names": {"0": "negative", "1": "positive"},
                     "instruction": "Is the sentiment of this sentence positive or negative? Answer with one word."},
            "model": {"name": "smollm2-135m-instruct", "objective": "completion", "lora_r": 8, "lora_alpha": 16},
            "train": {"output_dir": str(output_dir), "max_steps": 12, "eval_steps": 4, "logging_steps": 2,
                      "batch_size": 8, "max_length": 96},
            "eval": {"max_test_rows": 40, "num_samples": 2, "max_new_tokens": 8}}


def notebook(cfg: dict, data: Path) -> dict:
    source = ("import csv\nimport pandas as pd\nfrom nb_finetune.ui import Studio\n"
              f"frame = pd.read_csv({str(data)!r}, sep='\\t', quoting=csv.QUOTE_NONE, dtype=str)\n"
              "frame = frame.groupby('label').head(60).reset_index(drop=True)\n"
              f"studio = Studio({cfg!r}, data=frame)\nstudio\n")
    cell = {"cell_type": "code", "execution_count": None, "id": "studio", "metadata": {}, "outputs": [],
            "source": source}
    return {"cells": [cell],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path) -> tuple[subprocess.Popen, str, str]:
    port, token = free_port(), secrets.token_hex(16)
    # The kernel imports this checkout's package, whatever an installed copy points at.
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                        "JUPYTER_CONFIG_DIR": str(root / "jupyter-config"),
                        "JUPYTER_RUNTIME_DIR": str(root / "jupyter-runtime"),
                        "JUPYTERLAB_SETTINGS_DIR": str(root / "lab-settings"),
                        "JUPYTERLAB_WORKSPACES_DIR": str(root / "lab-workspaces")}
    # No toasts: the news question would sit over the studio's lower right corner.
    notification = root / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--ServerApp.allow_root=True"]
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return proc, url, token
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failure("jupyter lab did not start:\n" + lab_log(root)) from None
            time.sleep(0.5)


def lab_log(root: Path) -> str:
    path = root / "lab.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def cells_started(page) -> bool:
    """Whether the cell is queued, running or has run: its prompt shows [*] or a number."""
    return page.evaluate("Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
                         ".some(e => /\\[(\\*|\\d+)\\]/.test(e.innerText))")


def cells_state(page) -> str:
    return "\n".join(page.evaluate(
        "Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).map(c =>"
        " (c.querySelector('.jp-InputPrompt')?.innerText || '') + ' '"
        " + (c.querySelector('.jp-OutputArea')?.innerText || '').slice(0, 1500))"))


def wait_until(check, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise Failure(f"{what} did not appear within {timeout:.0f} s")


def run_notebook(page, studio) -> None:
    """Run All, as a user would, until the studio's tabs show."""
    # Not awaited: the command's promise ends only when every cell has run.
    run_all = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
    page.evaluate(run_all)
    tabs = studio.locator(".lm-TabBar-tab, .p-TabBar-tab")
    # JupyterLab may ask which kernel to use, or drop a Run All given while the notebook is
    # still attaching to its kernel; answer the dialog, and run again while nothing is queued.
    deadline, asked = time.monotonic() + 300, time.monotonic()
    while not tabs.count() and time.monotonic() < deadline:
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
            time.sleep(2)
            page.evaluate(run_all)
            asked = time.monotonic()
        elif time.monotonic() - asked > 15 and not cells_started(page):
            page.evaluate(run_all)
            asked = time.monotonic()
        time.sleep(0.5)
    if not tabs.count():
        raise Failure("the studio did not appear; the cell shows:\n" + cells_state(page))


def tab(studio, title: str) -> None:
    studio.locator(".lm-TabBar-tab, .p-TabBar-tab").filter(
        has_text=re.compile(rf"^\s*{re.escape(title)}\s*$")).first.click()


def panel_text(studio) -> str:
    """The text of the studio as shown: hidden tabs do not count."""
    return studio.inner_text()


def wait_for_text(studio, pattern: str, timeout: float, what: str) -> re.Match:
    return wait_until(lambda: re.search(pattern, panel_text(studio)), timeout, what)


def fail_on_panel_error(studio, where: str) -> None:
    # Panels show an error in a red box (common.message_html), never as printed text.
    if studio.locator("div[style*='background:#fdecea']").filter(visible=True).count():
        raise Failure(f"the {where} tab shows an error:\n" + panel_text(studio)[:3000])


def images_loaded(studio, name: str) -> None:
    """Wait until every visible picture in the studio has loaded; say which are broken or drawn
    out of proportion (a panel's problem, for whoever looks at the pictures)."""
    script = ("el => Array.from(el.querySelectorAll('img')).filter(i => i.offsetParent !== null)"
              ".map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,"
              " cw: i.clientWidth, ch: i.clientHeight}))")
    wait_until(lambda: all(i["complete"] for i in studio.evaluate(script)), 30, "the panel's pictures")
    for i in studio.evaluate(script):
        if i["w"] == 0:
            print(f"note: {name}: a picture shows as a broken image", file=sys.stderr)
        elif abs(i["cw"] / i["w"] - i["ch"] / i["h"]) > 0.05:
            print(f"note: {name}: a {i['w']}x{i['h']} picture is shown at {i['cw']}x{i['ch']}", file=sys.stderr)


def shoot(page, studio, path: Path, until=None) -> None:
    """The studio's output area alone, down to the bottom of `until` if given. A panel taller
    than the notebook's visible area would be cut off by its scrolling, so the window grows for
    the picture and shrinks back after."""
    images_loaded(studio, path.name)
    studio.scroll_into_view_if_needed()
    visible = page.locator(".jp-NotebookPanel .jp-WindowedPanel-outer, .jp-NotebookPanel .jp-Notebook").first
    needed = studio.bounding_box()["height"] - visible.bounding_box()["height"] + 40
    if needed > 0:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": VIEWPORT["height"] + int(needed)})
        time.sleep(0.5)
        studio.scroll_into_view_if_needed()
    if until is None:
        png = studio.screenshot()
    else:
        box, bottom = studio.bounding_box(), until.bounding_box()
        height = min(box["height"], bottom["y"] + bottom["height"] + 1 - box["y"])
        png = page.screenshot(clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": height})
    page.set_viewport_size(VIEWPORT)
    path.write_bytes(shrink(png))
    print(f"wrote {path} ({path.stat().st_size / 1000:.0f} KB)")


def shrink(png: bytes) -> bytes:
    """Scale a picture down until it is under MAX_BYTES (Pillow), or keep it as it is."""
    if len(png) <= MAX_BYTES:
        return png
    try:
        from PIL import Image
    except ImportError:
        return png
    original = Image.open(io.BytesIO(png)).convert("RGB")
    scale, out = 1.0, png
    while len(out) > MAX_BYTES and scale > 0.3:
        scale *= 0.9
        size = (round(original.width * scale), round(original.height * scale))
        buffer = io.BytesIO()
        original.resize(size, Image.LANCZOS).save(buffer, "PNG", optimize=True)
        out = buffer.getvalue()
    return out


def take(page, out: Path) -> None:
    studio = page.locator(".jp-OutputArea-output", has=page.locator(".lm-TabBar-tab, .p-TabBar-tab")).first
    run_notebook(page, studio)
    # The notebook gets the window's width: the file browser beside it is put away.
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")

    tab(studio, "Data")
    load = studio.locator("button", has_text="Load and check")
    load.wait_for(state="visible", timeout=30_000)
    load.click()
    wait_for_text(studio, r"loaded [\d,]+ rows and checked them", 120, "the Data tab's report")
    fail_on_panel_error(studio, "Data")
    shoot(page, studio, out / "studio.png")

    tab(studio, "Model")
    # The memory estimate is made when the studio opens if the model is in the cache.
    wait_for_text(studio, r"trainable", 120, "the Model tab's memory estimate")
    fail_on_panel_error(studio, "Model")
    shoot(page, studio, out / "model.png")

    tab(studio, "Train")
    start = studio.locator(".nbft-train-start")
    start.wait_for(state="visible", timeout=30_000)
    start.click()
    # Mid-run, late enough for two validations: one point alone gets an axis of fractional steps.
    step = wait_until(lambda: (m := re.search(r"step (\d+)/(\d+)", panel_text(studio))) and int(m[1]) >= 10 and m,
                      TRAIN_TIMEOUT, "step 10 in the Train tab", interval=0.2)
    time.sleep(1)  # the redraw follows the progress text
    fail_on_panel_error(studio, "Train")
    shoot(page, studio, out / "train.png")
    if int(step[1]) >= int(step[2]):
        print("note: training had ended when train.png was taken", file=sys.stderr)

    # Training's end starts the test, and the studio brings the Evaluate tab forward.
    page.wait_for_function("document.querySelector('.nbft-eval-metrics')?.innerText.includes('tuned')",
                           timeout=TRAIN_TIMEOUT * 1000)
    studio.locator(".nbft-eval-metrics").wait_for(state="visible", timeout=30_000)
    wait_for_text(studio, r"evaluated on [\d,]+ test rows", 60, "the Evaluate tab's status")
    fail_on_panel_error(studio, "Evaluate")
    shoot(page, studio, out / "evaluate.png")

    tab(studio, "Bias probe")
    limit = studio.locator(".widget-inline-hbox", has_text="pairs (0: all)").locator("input")
    limit.wait_for(state="visible", timeout=30_000)
    limit.fill(str(PROBE_PAIRS))
    limit.press("Enter")  # the box sends its value on Enter or when it loses focus
    studio.locator("button", has_text="Run on base and tuned").click()
    wait_for_text(studio, r"done: base and tuned probed", 300, "the Bias probe's result")
    fail_on_panel_error(studio, "Bias probe")
    if f"{PROBE_PAIRS} pairs" not in panel_text(studio):
        raise Failure(f"the probe did not run on {PROBE_PAIRS} pairs:\n" + panel_text(studio)[:2000])
    # The examples table lists 15 long pairs; three are enough to show what it holds.
    shoot(page, studio, out / "probe.png", until=studio.locator("table").last.locator("tr").nth(3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sst2" / "dev.tsv",
                        help="SST-2 dev.tsv (sentence<TAB>label)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    if not data.is_file():
        sys.exit(f"screenshots: no data file at {data} (pass --data PATH to SST-2's dev.tsv)")
    if not Path(CHROMIUM).exists():
        sys.exit(f"screenshots: {CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nbft-shots-") as tmp:
        root = Path(tmp)
        (root / "studio.ipynb").write_text(json.dumps(notebook(config(root / "run"), data)))
        proc = None
        try:
            proc, url, token = start_lab(root)
            # Start the notebook's kernel through the server's API, so the page attaches to it
            # instead of asking which kernel to start.
            request = urllib.request.Request(
                f"{url}/api/sessions?token={token}", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"path": "studio.ipynb", "type": "notebook", "name": "studio.ipynb",
                                 "kernel": {"name": "python3"}}).encode())
            urllib.request.urlopen(request, timeout=30)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
                try:
                    page.goto(f"{url}/lab/tree/studio.ipynb?token={token}")
                    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')",
                                           timeout=60_000)
                    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
                    page.wait_for_function("document.querySelector('.jp-Notebook-ExecutionIndicator')"
                                           "?.getAttribute('data-status') === 'idle'", timeout=90_000)
                    take(page, out)
                except (Failure, PlaywrightError) as err:
                    window = Path(tempfile.gettempdir()) / "nbft-screenshots-failed.png"
                    page.screenshot(path=str(window))
                    # The log first, so that the reason is the last thing printed.
                    print("jupyter lab's log, its end:\n" + lab_log(root), file=sys.stderr)
                    raise Failure(f"{err}\nthe whole window: {window}") from None
                finally:
                    browser.close()
        except Failure as err:
            sys.exit(f"screenshots: {err}")
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
