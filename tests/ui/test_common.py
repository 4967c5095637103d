"""What every panel shares: panels built with no arguments, forms that mark every problem
beside its field, settings shared between panels, errors shown in the panel with secrets
masked, and the same panels under ipywidgets 7.7 (what Colab ships).

Panels are driven headlessly: set widget values, click buttons, read what the panels show.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, SUBPROCESS_ENV


def test_panels_work_with_no_arguments(smollm2_dir):
    """The built-in demo: every panel builds, and the data panel loads and checks its data."""
    from nb_finetune.ui import DataPanel, EvalPanel, ExportPanel, Studio, TokenizationPanel, TrainPanel
    studio = Studio()
    assert [p.title for p in studio.panels] == ["Data", "Tokens", "Model", "Train", "Evaluate", "Bias probe",
                                                "Export"]
    assert all(p.error.value == "" for p in studio.panels)
    for panel in (TokenizationPanel(), TrainPanel(), EvalPanel(), ExportPanel()):
        assert panel.shared.config().data.source == "imdb-sample"
    data = DataPanel()
    data.load_button.click()
    assert data.error.value == "", data.error.value
    assert "imdb-sample" == data.source.value and sum(data.shared.current.prep.report.split_sizes.values()) == 200


def test_secrets_never_reach_the_panel(ui_config, tmp_path, monkeypatch):
    from nb_finetune.ui import DataPanel
    secret = "hf_" + "Q" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    panel = DataPanel(config=ui_config)
    panel.source.value = str(tmp_path / f"{secret}.csv")
    panel.load_button.click()
    assert panel.error.value and secret not in panel.error.value and "***" in panel.error.value


def test_invalid_values_are_shown_beside_their_fields_all_at_once(ui_config):
    from nb_finetune.ui import ModelPanel
    panel = ModelPanel(config=ui_config)
    train = next(f for f in panel.forms if "train.learning_rate" in f.controls)
    train.controls["train.learning_rate"].value = -1.0
    train.controls["train.batch_size"].value = 0
    lora = next(f for f in panel.forms if "model.lora_dropout" in f.controls)
    lora.controls["model.lora_dropout"].value = 2.0
    marked = {k for f in panel.forms for k, label in f.errors.items() if label.value}
    assert marked == {"train.learning_rate", "train.batch_size", "model.lora_dropout"}
    assert "between 1 and 4096" in train.errors["train.batch_size"].value
    panel.estimate_button.click()  # all three named together in the panel too
    assert "3 problems" in panel.error.value
    train.controls["train.learning_rate"].value = 1e-4
    assert train.errors["train.learning_rate"].value == ""


def test_a_setting_shown_in_two_panels_stays_in_sync(ui_config):
    from nb_finetune.ui import ModelPanel, Shared, TokenizationPanel
    shared = Shared(ui_config)
    tokens, model = TokenizationPanel(shared), ModelPanel(shared)
    tokens.forms[0].controls["train.max_length"].value = 48
    control = next(f for f in model.forms if "train.max_length" in f.controls).controls["train.max_length"]
    assert control.value == 48 and shared.config().train.max_length == 48


@pytest.mark.slow
def test_panels_work_with_ipywidgets_7(tmp_path_factory):
    """The panel tests (every file in tests/ui but the slow ones) again, in a process that
    imports ipywidgets 7.7 instead of 8."""
    target = tmp_path_factory.mktemp("ipywidgets7")
    pins = ["ipywidgets==7.7.5", "widgetsnbextension==3.6.10", "jupyterlab_widgets==1.1.11",
            "ipython_genutils==0.2.0"]
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          *pins], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"could not install ipywidgets 7.7 here: {pip.stderr[-300:]}")
    env = SUBPROCESS_ENV | {"PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    check = subprocess.run([sys.executable, "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "7.7.5"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-m", "not slow", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "ui")], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "no tests ran" not in run.stdout
