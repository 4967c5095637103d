"""Screenshots of the studio as a person sees it in JupyterLab, for the documentation.

Starts `jupyter lab` on 127.0.0.1 (a token, a free port, a throw-away folder), writes a
notebook that shows `Studio(config, data=frame)` over 120 SST-2 rows with a tiny, fast
configuration (SmolLM2-135M-Instruct, 12 steps), and drives it with Playwright and Debian's
Chromium as the browser test does (both start JupyterLab, and click, type and wait on the page,
through docs/browser_lab.py): load the data, preview the tokens, look at the model, train, let
the evaluation run, run two small bias probes and export. Each picture is of the studio's
output area only:

    studio.png       the Data tab after "Load and check" (what a user sees first)
    tokens.png       the Tokens tab: one row's tokens by role, and the padding of batches
    model.png        the Model tab: settings, trainable parameters, memory estimate
    train.png        the Train tab mid-run, the live plot showing the first logged steps
    evaluate.png     the Evaluate tab after the evaluation that follows training
    probe.png        the Bias probe tab after a 40-pair CrowS-Pairs probe
    completions.png  the Bias probe tab after a completion probe for two groups
    counterfactual.png  the Bias probe tab after counterfactual sentences scored by the classifier
    export.png       the Export tab after exporting the adapter, the config and a job folder
    runs.png         the Runs tab after a second run with another LoRA rank: the two compared

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
import sys
import tempfile
import time
from pathlib import Path

import browser_lab  # beside this file: run as a script, its folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1200, "height": 900}
MAX_BYTES = 150_000  # a larger PNG is reduced to 256 colours, then scaled down
PROBE_PAIRS = 40
# Generous: on a small machine shared with other jobs, training runs several times slower.
TRAIN_TIMEOUT = 900


class Failure(Exception):
    """Something the pictures need never appeared."""


def config() -> dict:
    """The demo model on a tiny run: a few steps, a short test, two samples. SmolLM2's chat
    template and the instruction take about 50 tokens, so max_length 96 cuts no sentence. The
    output folder is relative to the notebook, so that the pictures show short paths."""
    return {"data": {"task": "classification", "text_column": "sentence",
                     "label_names": {"0": "negative", "1": "positive"},
                     "instruction": "Is the sentiment of this sentence positive or negative? Answer with one word."},
            "model": {"name": "smollm2-135m-instruct", "objective": "completion", "lora_r": 8, "lora_alpha": 16},
            "train": {"output_dir": "runs/sst2", "max_steps": 12, "eval_steps": 4, "logging_steps": 2,
                      "batch_size": 8, "max_length": 96},
            "eval": {"max_test_rows": 40, "num_samples": 2, "max_new_tokens": 8}}


def must_appear(check, timeout: float, what: str, interval: float = 0.3):
    """browser_lab.wait_until's answer; a Failure naming `what` if it never came."""
    value = browser_lab.wait_until(check, timeout, interval)
    if not value:
        raise Failure(f"{what} did not appear within {timeout:.0f} s")
    return value


def panel_text(studio) -> str:
    """The text of the studio as shown: hidden tabs do not count."""
    return studio.inner_text()


def wait_for_text(studio, pattern: str, timeout: float, what: str) -> re.Match:
    return must_appear(lambda: re.search(pattern, panel_text(studio)), timeout, what)


def fail_on_panel_error(studio, where: str) -> None:
    if browser_lab.error_boxes(studio).count():
        raise Failure(f"the {where} tab shows an error:\n" + panel_text(studio)[:3000])


def images_loaded(studio, name: str) -> None:
    """Wait until every visible picture in the studio has loaded. A broken one stops the script
    (no such picture belongs in the docs); one drawn out of proportion is noted."""
    shown = browser_lab.pictures(studio, 30)
    if not all(i["complete"] for i in shown):
        raise Failure("the panel's pictures did not appear within 30 s")
    for i in shown:
        if i["width"] == 0:
            raise Failure(f"{name}: a picture shows as a broken image")
        if abs(i["shown_width"] / i["width"] - i["shown_height"] / i["height"]) > 0.05:
            print(f"note: {name}: a {i['width']}x{i['height']} picture is shown at "
                  f"{i['shown_width']}x{i['shown_height']}", file=sys.stderr)


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
    """Under MAX_BYTES if Pillow is here: 256 colours first (a screenshot has few, and text
    stays sharp), then smaller sizes."""
    if len(png) <= MAX_BYTES:
        return png
    try:
        from PIL import Image
    except ImportError:
        return png
    original = Image.open(io.BytesIO(png)).convert("RGB")
    scale, out = 1.0, png
    while len(out) > MAX_BYTES and scale > 0.3:
        size = (round(original.width * scale), round(original.height * scale))
        buffer = io.BytesIO()
        original.resize(size, Image.LANCZOS).quantize(colors=256).save(buffer, "PNG", optimize=True)
        out = buffer.getvalue()
        scale *= 0.9
    return out


def take_data_tokens_model(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Data")
    load = studio.locator("button", has_text="Load and check")
    load.wait_for(state="visible", timeout=30_000)
    load.click()
    wait_for_text(studio, r"loaded [\d,]+ rows and checked them", 120, "the Data tab's report")
    fail_on_panel_error(studio, "Data")
    shoot(page, studio, out / "studio.png")

    browser_lab.click_tab(studio, "Tokens")
    studio.locator("button", has_text="Preview").click()
    wait_for_text(studio, r"row 0: \d+ tokens", 120, "the Tokens tab's preview")
    fail_on_panel_error(studio, "Tokens")
    shoot(page, studio, out / "tokens.png")

    browser_lab.click_tab(studio, "Model")
    # The memory estimate is made when the studio opens if the model is in the cache.
    wait_for_text(studio, r"trainable", 120, "the Model tab's memory estimate")
    fail_on_panel_error(studio, "Model")
    shoot(page, studio, out / "model.png")


def take_train_evaluate(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Train")
    start = studio.locator(".nbft-train-start")
    start.wait_for(state="visible", timeout=30_000)
    start.click()
    # Mid-run, late enough for two validations: one point alone makes a poor curve.
    step = must_appear(lambda: (m := re.search(r"step (\d+)/(\d+)", panel_text(studio))) and int(m[1]) >= 10 and m,
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


def take_probes(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Bias probe")
    browser_lab.set_box(studio, "pairs (0: all)", str(PROBE_PAIRS))
    run = studio.locator("button", has_text="Run on base and tuned")
    run.click()
    wait_for_text(studio, r"done: base and tuned probed", 300, "the Bias probe's result")
    fail_on_panel_error(studio, "Bias probe")
    if f"{PROBE_PAIRS} pairs" not in panel_text(studio):
        raise Failure(f"the probe did not run on {PROBE_PAIRS} pairs:\n" + panel_text(studio)[:2000])
    # The examples table lists 15 long pairs; three are enough to show what it holds.
    shoot(page, studio, out / "probe.png", until=studio.locator("table").filter(visible=True).last.locator("tr").nth(3))

    browser_lab.choose(studio, "probe", "completions from templates")
    browser_lab.set_box(studio, "samples per prompt", "2")
    run.click()
    # The status line says "done" after the pair probe too: the button coming back ends this run.
    must_appear(lambda: "gap between groups" in panel_text(studio) and run.is_enabled(), 300,
               "the completion probe's result")
    fail_on_panel_error(studio, "Bias probe")
    shoot(page, studio, out / "completions.png", until=studio.locator("table").filter(visible=True).last)

    browser_lab.choose(studio, "probe", "counterfactual sentences (the tuned classifier)")
    run.click()
    must_appear(lambda: "Kiritchenko" in panel_text(studio) and run.is_enabled(), 300,
                "the counterfactual sentences' result")
    fail_on_panel_error(studio, "Bias probe")
    shoot(page, studio, out / "counterfactual.png", until=studio.locator("table").filter(visible=True).last.locator("tr").nth(4))


def take_export(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Export")
    studio.locator("button", has_text="Export").click()
    wait_for_text(studio, r"exported to ", 300, "the Export tab's list of files")
    fail_on_panel_error(studio, "Export")
    shoot(page, studio, out / "export.png")


def take_runs(page, studio, out: Path) -> None:
    """A second run with LoRA rank 4 instead of 8 (it goes to runs/sst2-2), then the Runs tab:
    both runs, what the second changed, their curves and its config diff."""
    browser_lab.click_tab(studio, "Model")
    browser_lab.set_box(studio, "lora_r", "4")
    browser_lab.click_tab(studio, "Train")
    studio.locator(".nbft-train-start").click()
    # The Runs tab refreshes when the test after training has added its figures to the record.
    table = studio.locator(".nbft-runs-table")
    must_appear(lambda: table.text_content().count("accuracy") >= 2 and "lora_r=4" in table.text_content(),
                TRAIN_TIMEOUT, "the second run, tested, in the Runs tab")
    diff = studio.locator(".nbft-runs-diff")

    def runs_tab_shown() -> bool:
        # Clicked again until it stays: the studio brings the Evaluate tab forward as the test ends.
        browser_lab.click_tab(studio, "Runs")
        time.sleep(1)
        return diff.is_visible() and "settings of" in diff.text_content()

    must_appear(runs_tab_shown, 60, "the Runs tab's config diff", interval=2)
    fail_on_panel_error(studio, "Runs")
    shoot(page, studio, out / "runs.png")


def run_studio(page, lab):
    """Run the notebook's cells, widen it, and return the studio's output area."""
    studio = page.locator(".jp-OutputArea-output", has=page.locator(browser_lab.TABS)).first
    browser_lab.run_all(page, lab, lambda: studio.count() > 0)
    browser_lab.full_width(page)
    return studio


def take(page, out: Path, lab) -> None:
    studio = run_studio(page, lab)
    take_data_tokens_model(page, studio, out)
    take_train_evaluate(page, studio, out)
    take_probes(page, studio, out)
    take_export(page, studio, out)
    take_runs(page, studio, out)


def sst2_cell(data: Path) -> str:
    return browser_lab.sst2_studio_cell(config(), data)


def shots(root: Path, data: Path, out: Path, cell=sst2_cell, pictures=take) -> None:
    """Serve `root`, open a notebook of the studio's cell (`cell(data)`) in Chromium and take
    the pictures (`pictures(page, out, lab)`)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
    (root / "studio.ipynb").write_text(json.dumps(browser_lab.notebook([cell(data)])))
    # The kernel imports this checkout's package, whatever an installed copy points at.
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1"}
    lab = browser_lab.start_lab(root, env)
    try:
        with sync_playwright() as p:
            browser = browser_lab.launch(p)
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            try:
                browser_lab.open_notebook(page, lab, "studio.ipynb")
                pictures(page, out, lab)
            except (Failure, PlaywrightError) as err:
                window = Path(tempfile.gettempdir()) / "nbft-screenshots-failed.png"
                page.screenshot(path=str(window))
                # The log first, so that the reason is the last thing printed.
                print("jupyter lab's log, its end:\n" + lab.log(), file=sys.stderr)
                raise Failure(f"{err}\nthe whole window: {window}") from None
            finally:
                browser.close()
    finally:
        browser_lab.stop_lab(lab)


def main(argv: list[str] | None = None, cell=sst2_cell, pictures=take) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sst2" / "dev.tsv",
                        help="SST-2 dev.tsv (sentence<TAB>label)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    if not data.is_file():
        sys.exit(f"screenshots: no data file at {data} (pass --data PATH to SST-2's dev.tsv)")
    if why := browser_lab.missing():
        sys.exit(f"screenshots: {why}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nbft-shots-") as tmp:
        try:
            shots(Path(tmp), data, out, cell, pictures)
        except (Failure, browser_lab.LabError) as err:
            sys.exit(f"screenshots: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
