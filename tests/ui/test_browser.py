"""The studio in a real browser: JupyterLab on 127.0.0.1, driven by Playwright with Debian's
Chromium (no browser download). Opens a notebook, runs it, clicks Start, sees the plot image
change while training, clicks Stop, and sees the run stop and the evaluation appear: once with
the studio made in Python, once through `%load_ext nb_finetune` and a config cell.

Needs `chromium` (Debian package) and the `playwright` and `jupyterlab` Python packages;
`.ci/run` installs them and sets NB_FINETUNE_REQUIRE_BROWSER=1 so that their absence fails
there instead of skipping.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import SUBPROCESS_ENV

CHROMIUM = "/usr/bin/chromium"
# Chromium's background services try the network at start; this machine refuses them.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def _missing() -> str:
    import importlib.util
    if not Path(CHROMIUM).exists():
        return "Debian chromium is not installed (apt-get install chromium)"
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module} is not installed"
    return ""


@pytest.fixture(scope="module")
def browser_ready():
    why = _missing()
    if why:
        if os.environ.get("NB_FINETUNE_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(config: dict, sst2: Path, style: str) -> dict:
    """The studio made from Python (`import`), or through the IPython extension (`magic`)."""
    show = "studio.tabs.selected_index = studio.panels.index(studio.train)\nstudio\n"
    if style == "import":
        sources = [
            "import csv\nimport pandas as pd\nfrom nb_finetune.ui import Studio\n"
            f"frame = pd.read_csv({str(sst2)!r}, sep='\\t', quoting=csv.QUOTE_NONE, dtype=str)\n"
            "frame = frame.groupby('label').head(60).reset_index(drop=True)\n"
            f"studio = Studio({config!r}, data=frame)\n" + show]
    else:
        config = config | {"data": config["data"] | {"source": str(sst2), "text_column": "sentence",
                                                     "max_rows": 120}}
        sources = ["%load_ext nb_finetune", "%%finetune_config\n" + yaml.safe_dump(config),
                   "studio = %finetune studio\n" + show]
    cells = [{"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {}, "outputs": [],
              "source": source} for i, source in enumerate(sources)]
    return {"cells": cells,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def lab(tmp_path, browser_ready):
    port, token = _free_port(), secrets.token_hex(16)
    env = SUBPROCESS_ENV | {"JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
                            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--ServerApp.allow_root=True"]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("jupyter lab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, token, tmp_path
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _cells_started(page) -> bool:
    """Whether any cell is queued, running or has run: its prompt shows [*] or a number."""
    return page.evaluate("Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
                         ".some(e => /\\[(\\*|\\d+)\\]/.test(e.innerText))")


def _cells_state(page) -> str:
    """Each cell's prompt and the start of its output, to say why a run did not get far."""
    return "\n".join(page.evaluate(
        "Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).map(c =>"
        " (c.querySelector('.jp-InputPrompt')?.innerText || '') + ' '"
        " + (c.querySelector('.jp-OutputArea')?.innerText || '').slice(0, 1500))"))


@pytest.mark.parametrize("style", ["import", "magic"])
def test_studio_in_jupyterlab_trains_live_stops_and_evaluates(lab, tiny_model_dir, shared_data, style):
    from playwright.sync_api import sync_playwright
    url, token, root = lab
    config = {"data": {"task": "classification", "label_names": {"0": "negative", "1": "positive"}},
              "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
              "train": {"output_dir": str(root / "run"), "max_steps": 5000, "batch_size": 4, "eval_steps": 5,
                        "logging_steps": 1, "max_length": 64},
              "eval": {"num_samples": 2, "max_new_tokens": 4}}
    (root / "studio.ipynb").write_text(json.dumps(_notebook(config, shared_data / "sst2" / "dev.tsv", style)))
    # Start the notebook's kernel through the server's API, so the page attaches to it instead
    # of asking which kernel to start.
    request = urllib.request.Request(
        f"{url}/api/sessions?token={token}", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"path": "studio.ipynb", "type": "notebook", "name": "studio.ipynb",
                         "kernel": {"name": "python3"}}).encode())
    urllib.request.urlopen(request, timeout=30)
    shots = root / "screenshots"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/studio.ipynb?token={token}")
            page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # Wait for the kernel, then run the notebook as a user would with Run All.
            page.wait_for_function("document.querySelector('.jp-Notebook-ExecutionIndicator')"
                                   "?.getAttribute('data-status') === 'idle'", timeout=90_000)
            # Not awaited: the command's promise ends only when every cell has run.
            run_all = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
            page.evaluate(run_all)
            start = page.locator(".nbft-train-start")
            # JupyterLab may ask which kernel to use the first time, or drop a Run All given while
            # the notebook is still attaching to its kernel; either way nothing runs. Answer the
            # dialog with the default, and run again while no cell has been queued. The first
            # cell's imports can take minutes on a CI machine whose other test worker is training.
            deadline, asked = time.monotonic() + 300, time.monotonic()
            while not start.is_visible() and time.monotonic() < deadline:
                accept = page.locator(".jp-Dialog .jp-mod-accept")
                if accept.count():
                    accept.first.click()
                    time.sleep(2)
                    page.evaluate(run_all)
                    asked = time.monotonic()
                elif time.monotonic() - asked > 15 and not _cells_started(page):
                    page.evaluate(run_all)
                    asked = time.monotonic()
                time.sleep(0.5)
            if not start.is_visible():
                pytest.fail("the studio's Start button did not appear; cells:\n" + _cells_state(page)
                            + "\nlab log:\n" + (root / "lab.log").read_text()[-3000:])
            plot = page.locator(".nbft-train-plot")
            plot.wait_for(state="visible", timeout=30_000)
            first = plot.get_attribute("src")
            start.click()
            seen = {first}
            deadline = time.monotonic() + 180
            while len(seen) < 3 and time.monotonic() < deadline:  # two redraws after the first
                seen.add(plot.get_attribute("src"))
                time.sleep(0.2)
            page.screenshot(path=str(shots / "training.png"))
            assert len(seen) >= 3, "the training plot did not change while training"
            page.locator(".nbft-train-stop").click()
            outcome = page.locator(".nbft-train-outcome")
            page.wait_for_function("document.querySelector('.nbft-train-outcome')?.innerText"
                                   ".includes('stopped at step')", timeout=120_000)
            assert "stopped at step" in outcome.inner_text()
            # The studio moves to the Evaluate tab once the test has run.
            page.wait_for_function("document.querySelector('.nbft-eval-metrics')?.innerText.includes('tuned')",
                                   timeout=180_000)
            metrics = page.locator(".nbft-eval-metrics")
            metrics.wait_for(state="visible", timeout=30_000)  # the Evaluate tab is brought forward
            text = metrics.inner_text()
            assert "base" in text and "majority class" in text
            page.screenshot(path=str(shots / "evaluated.png"))
            # Nothing but the widget in the cell's output: no text printed by the training thread.
            printed = page.evaluate("Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                                    ".filter(e => e.querySelector('.jp-RenderedText')).map(e => e.innerText)")
            assert printed == [], printed
        finally:
            page.screenshot(path=str(shots / "last.png"))
            browser.close()
    history = root / "run" / "history.csv"
    assert history.is_file() and list((root / "run" / "checkpoints").glob("checkpoint-*"))
    if os.environ.get("NB_FINETUNE_SCREENSHOTS"):  # keep the pictures for a person to look at
        shutil.copytree(shots, os.environ["NB_FINETUNE_SCREENSHOTS"], dirs_exist_ok=True)
