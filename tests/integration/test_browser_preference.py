"""The studio on preference pairs in a real browser (JupyterLab, Debian's Chromium through
Playwright, as in test_browser.py): on the tiny llama and 40 pairs of SST-2 sentences, every
control of every tab is shown (the Train tab's method, beta and DPO loss among them), no picture
is broken and no panel shows an error; then the Tokens tab shows a pair side by side, a DPO run
trains, and the Evaluate tab shows tuned against base on the held-out pairs with the picture of
their margins, with nothing printed in the notebook."""
from __future__ import annotations

import pytest
from conftest import browser_lab
from panel_checks import TAG_CELL, check_panel, controls, printed_outputs

pytestmark = pytest.mark.slow


def studio_cell(config: dict, sst2) -> str:
    return ("import csv\nimport pandas as pd\n"
            f"dev = pd.read_csv({str(sst2)!r}, sep='\\t', quoting=csv.QUOTE_NONE, dtype=str)\n"
            "pos, neg = dev[dev.label == '1'].sentence.head(40), dev[dev.label == '0'].sentence.head(40)\n"
            "pairs = pd.DataFrame({'prompt': [f'Write a positive review sentence ({i}).' for i in range(40)],\n"
            "                      'chosen': pos.values, 'rejected': neg.values})\n"
            f'show("studio", ui.Studio({config!r}, data=pairs))')


def test_the_studio_on_preference_pairs_in_jupyterlab(lab, tiny_model_dir, shared_data):
    from playwright.sync_api import sync_playwright
    config = {"data": {"task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
              "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
              "train": {"output_dir": str(lab.root / "run"), "method": "dpo", "max_steps": 6, "batch_size": 4,
                        "eval_steps": 3, "logging_steps": 1, "max_length": 96, "learning_rate": 1e-3},
              "eval": {"num_samples": 2, "max_new_tokens": 4}}
    nb = browser_lab.notebook([TAG_CELL, studio_cell(config, shared_data / "sst2" / "dev.tsv")])
    with sync_playwright() as p:
        browser, page = browser_lab.open_page(p, lab, nb)
        studio = page.locator(".nbft-show-studio")
        try:
            browser_lab.run_all(page, lab, lambda: studio.count() > 0 and page.locator(".nbft-train-start").count())
            found = controls(lab.root, "studio")
            assert {"method", "beta", "dpo_loss"} <= {c["description"] for c in found["controls"]
                                                      if c.get("tab") == "Train"}
            problems: list[str] = []
            check_panel(studio, found, "studio", problems)
            assert problems == [], "\n".join(problems)
            browser_lab.click_tab(studio, "Tokens")
            studio.locator("button", has_text="Preview").click()
            assert browser_lab.wait_until(lambda: "pair batches" in studio.inner_text(), 120), studio.inner_text()[:2000]
            text = studio.inner_text()
            assert "shared prompt" in text and "chosen (" in text and "rejected (" in text
            browser_lab.click_tab(studio, "Train")
            page.locator(".nbft-train-start").click()
            # Training's end runs the test; the studio brings the Evaluate tab forward.
            page.wait_for_function("document.querySelector('.nbft-eval-metrics')?.innerText.includes('tuned')",
                                   timeout=300_000)
            margins = page.locator("img.nbft-eval-margins")
            margins.wait_for(state="visible", timeout=30_000)
            assert margins.evaluate("i => i.complete && i.naturalWidth > 0"), "no margins picture"
            metrics = page.locator(".nbft-eval-metrics").inner_text()
            assert "preference accuracy" in metrics and "base" in metrics
            assert browser_lab.error_boxes(studio).count() == 0, studio.inner_text()[:3000]
            assert printed_outputs(page) == []
        finally:
            browser.close()
