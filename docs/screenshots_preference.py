"""Screenshots of the studio on a preference run (DPO), for docs/preference.md.

As docs/screenshots.py does (JupyterLab on 127.0.0.1, Playwright driving Debian's Chromium,
through docs/browser_lab.py), over 40 pairs built from SST-2: the prompt asks for a positive
movie-review sentence, a positive sentence is chosen and a negative one rejected.
SmolLM2-135M-Instruct trains 12 DPO steps, is evaluated on the held-out pairs, then trains again
with another beta for the Runs tab. Each picture is of the studio's output area only:

    preference_data.png      the Data tab: the pair checks and the length-bias figure
    preference_tokens.png    the Tokens tab: one pair side by side, and the pair batches
    preference_train.png     the Train tab at the end of the run: loss, rewards, accuracy
    preference_evaluate.png  the Evaluate tab: tuned against base on the held-out pairs
    preference_probe.png     the Bias probe tab on this run's held-out pairs, base against tuned
    preference_export.png    the Export tab after the DPO run: the adapter and an f16 GGUF, checked
    preference_runs.png      the Runs tab: two DPO runs (beta 0.1 and 0.5), reward margins overlaid

Run from anywhere (this checkout's package is the one imported):

    python docs/screenshots_preference.py [--data PATH] [--out docs/images]
"""
from __future__ import annotations

import sys
from pathlib import Path

import browser_lab  # beside this file: run as a script, its folder is on sys.path
import screenshots
from screenshots import fail_on_panel_error, must_appear, panel_text, shoot, wait_for_text

REPO = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT = 900
PROMPT = "Write one sentence from a positive movie review."


def config() -> dict:
    """DPO on SmolLM2 with a short run: 12 steps of 4 pairs, validation every 4 steps, 8 test
    pairs and two samples. max_length 96 cuts no SST-2 sentence after the chat template."""
    return {"data": {"task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
            "model": {"name": "smollm2-135m-instruct", "lora_r": 8, "lora_alpha": 16},
            "train": {"output_dir": "runs/dpo", "method": "dpo", "beta": 0.1, "max_steps": 12, "eval_steps": 4,
                      "logging_steps": 1, "batch_size": 4, "max_length": 96, "learning_rate": 5e-4},
            "eval": {"max_test_rows": 8, "num_samples": 2, "max_new_tokens": 20}}


def studio_cell(data: Path) -> str:
    """`studio = Studio(config, data=pairs)`: 40 pairs of SST-2 sentences, positive chosen."""
    return ("import csv\nimport pandas as pd\nfrom nb_finetune.ui import Studio\n"
            f"dev = pd.read_csv({str(data)!r}, sep='\\t', quoting=csv.QUOTE_NONE, dtype=str)\n"
            "pos = dev[dev.label == '1'].sentence.sample(40, random_state=0).tolist()\n"
            "neg = dev[dev.label == '0'].sentence.sample(40, random_state=0).tolist()\n"
            f"pairs = pd.DataFrame({{'prompt': {PROMPT!r}, 'chosen': pos, 'rejected': neg}})\n"
            f"studio = Studio({config()!r}, data=pairs)\nstudio\n")


def take_data_tokens(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Data")
    studio.locator("button", has_text="Load and check").click()
    wait_for_text(studio, r"loaded [\d,]+ rows and checked them", 180, "the Data tab's report")
    fail_on_panel_error(studio, "Data")
    shoot(page, studio, out / "preference_data.png", until=studio.locator("img").filter(visible=True).last)
    browser_lab.click_tab(studio, "Tokens")
    studio.locator("button", has_text="Preview").click()
    wait_for_text(studio, r"pair 0: a prompt of \d+ tokens", 120, "the Tokens tab's pair")
    fail_on_panel_error(studio, "Tokens")
    shoot(page, studio, out / "preference_tokens.png", until=studio.locator("table").filter(visible=True).last)


def take_train_evaluate(page, studio, out: Path) -> None:
    browser_lab.click_tab(studio, "Train")
    studio.locator(".nbft-train-start").click()
    page.wait_for_function("document.querySelector('.nbft-eval-metrics')?.innerText.includes('tuned')",
                           timeout=TRAIN_TIMEOUT * 1000)
    wait_for_text(studio, r"evaluated on [\d,]+ test pairs", 120, "the Evaluate tab's status")
    fail_on_panel_error(studio, "Evaluate")
    shoot(page, studio, out / "preference_evaluate.png", until=studio.locator(".nbft-eval-samples"))
    browser_lab.click_tab(studio, "Train")
    must_appear(lambda: "finished 12 steps" in panel_text(studio), 60, "the Train tab's outcome")
    fail_on_panel_error(studio, "Train")
    shoot(page, studio, out / "preference_train.png")


def take_probe_export(page, studio, out: Path) -> None:
    """The Bias probe tab on the run's held-out test pairs (rejected as the stereotypical side),
    then the Export tab writing the adapter and an f16 GGUF, which the round trip checks."""
    browser_lab.click_tab(studio, "Bias probe")
    browser_lab.choose(studio, "probe", "this run's held-out preference pairs (rejected as stereotypical)")
    studio.locator("button", has_text="Run on base and tuned").click()
    wait_for_text(studio, r"done: base and tuned probed", 300, "the Bias probe tab's result")
    fail_on_panel_error(studio, "Bias probe")
    shoot(page, studio, out / "preference_probe.png", until=studio.locator("img").filter(visible=True).last)
    browser_lab.click_tab(studio, "Export")
    browser_lab.choose(studio, "GGUF (llama.cpp)", "f16 (exact)")
    studio.locator("button", has_text="Export").filter(visible=True).first.click()
    wait_for_text(studio, r"exported to ", 600, "the Export tab's result")
    fail_on_panel_error(studio, "Export")
    shoot(page, studio, out / "preference_export.png")


def take_runs(page, studio, out: Path) -> None:
    """A second run with beta 0.5 (it goes to runs/dpo-2), then the Runs tab with the reward
    margins of both runs overlaid."""
    browser_lab.click_tab(studio, "Train")
    browser_lab.set_box(studio, "beta", "0.5")
    studio.locator(".nbft-train-start").click()
    table = studio.locator(".nbft-runs-table")
    # The test figure's name heads its column once every run listed has one: both runs tested.
    must_appear(lambda: "test preference accuracy" in table.text_content() and "beta=0.5" in table.text_content(),
                TRAIN_TIMEOUT, "the second run, tested, in the Runs tab")

    def runs_tab_shown() -> bool:
        browser_lab.click_tab(studio, "Runs")  # again until it stays: the test's end brings Evaluate forward
        page.wait_for_timeout(1000)
        return table.is_visible()

    must_appear(runs_tab_shown, 60, "the Runs tab", interval=2)
    browser_lab.choose(studio, "curve", "reward margin")
    page.wait_for_timeout(2000)  # the plot is redrawn for the chosen curve
    fail_on_panel_error(studio, "Runs")
    shoot(page, studio, out / "preference_runs.png", until=studio.locator(".nbft-runs-plot"))


def take(page, out: Path, lab) -> None:
    studio = screenshots.run_studio(page, lab)
    take_data_tokens(page, studio, out)
    take_train_evaluate(page, studio, out)
    take_probe_export(page, studio, out)
    take_runs(page, studio, out)


if __name__ == "__main__":
    sys.exit(screenshots.main(cell=studio_cell, pictures=take))
