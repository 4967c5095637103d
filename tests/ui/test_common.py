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
from conftest import PNG, REPO, SUBPROCESS_ENV

# What the run under ipywidgets 7.7 must pass by name: what is shown and hidden, and no Layout
# that hides one widget hiding another.
VISIBILITY_TESTS = ["test_each_probe_shows_only_its_own_inputs", "test_no_two_widgets_share_a_layout",
                    "test_every_image_is_hidden_until_it_has_a_picture",
                    "test_a_picture_shows_its_hint_until_it_has_a_picture"]


def tree(widget):
    """The widget and every widget below it (a Tab's or an Accordion's pages included)."""
    yield widget
    for child in getattr(widget, "children", None) or ():
        yield from tree(child)


def shown(widget) -> bool:
    return widget.layout.display != "none"


def shared_layouts(root) -> list[tuple[str, str]]:
    """Pairs of widgets under `root` holding the same Layout object: hiding one hides the other."""
    owner, found = {}, []
    for w in tree(root):
        first = owner.setdefault(id(w.layout), w)
        if first is not w:
            found.append((repr(first)[:80], repr(w)[:80]))
    return found


def fresh_panels() -> list:
    """The studio and every panel alone, each as it first appears (the built-in demo)."""
    from nb_finetune.ui import DataPanel, EvalPanel, ExportPanel, ModelPanel, ProbePanel, Studio, TokenizationPanel, TrainPanel
    return [Studio(), DataPanel(), TokenizationPanel(), ModelPanel(), TrainPanel(), EvalPanel(), ProbePanel(),
            ExportPanel()]


def test_panels_work_with_no_arguments(smollm2_dir):
    """The built-in demo: every panel builds, and the data panel loads and checks its data."""
    from nb_finetune.ui import DataPanel, EvalPanel, ExportPanel, Studio, TokenizationPanel, TrainPanel
    studio = Studio()
    assert [p.title for p in studio.panels] == ["Data", "Tokens", "Model", "Train", "Evaluate", "Bias probe",
                                                "Export", "Runs"]
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
    assert "nbft-error-box" in panel.error.value  # the class browser_lab.ERROR_BOX finds it by


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


def test_no_two_widgets_share_a_layout():
    """A Layout shared by two widgets once hid the probe dropdown along with the path."""
    import ipywidgets as widgets
    for panel in fresh_panels():
        assert shared_layouts(panel) == [], type(panel).__name__
    # the check itself finds a shared one
    a = widgets.Text()
    assert len(shared_layouts(widgets.VBox([a, widgets.Text(layout=a.layout)]))) == 1


def test_every_image_is_hidden_until_it_has_a_picture():
    """An empty Image shows in the browser as a broken-picture icon: every image sits in a
    Picture, hidden with its hint shown until it has a picture."""
    import ipywidgets as widgets

    from nb_finetune.ui.common import Picture
    for panel in fresh_panels():
        widgets_here = list(tree(panel))
        pictures = [w for w in widgets_here if isinstance(w, Picture)]
        images = [w for w in widgets_here if isinstance(w, widgets.Image)]
        assert sorted(map(id, images)) == sorted(id(p.image) for p in pictures), "an Image outside a Picture"
        for picture in pictures:
            assert shown(picture.image) == bool(picture.value) != shown(picture.hint), picture.hint.value
    studio = fresh_panels()[0]
    hints = [w.hint.value for w in tree(studio) if isinstance(w, Picture) and shown(w.hint)]
    assert len(hints) >= 4 and any("class balance appears here" in h for h in hints)
    assert studio.train.plot.value.startswith(PNG) and shown(studio.train.plot.image)  # empty axes at once


def test_a_picture_shows_its_hint_until_it_has_a_picture():
    from matplotlib.figure import Figure

    from nb_finetune.ui.common import Picture
    picture = Picture("The plot appears here once it exists.")
    assert shown(picture.hint) and not shown(picture.image) and picture.value == b""
    assert "The plot appears here" in picture.hint.value
    fig = Figure(figsize=(2.0, 1.0))
    fig.subplots()
    picture.show(fig)
    assert shown(picture.image) and not shown(picture.hint) and picture.value.startswith(PNG)
    # at its own pixel size: the width the PNG header gives (2 inches at 90 dpi, about 180)
    assert picture.image.width == str(int.from_bytes(picture.value[16:20], "big"))
    assert 150 <= int(picture.image.width) <= 200
    assert picture.layout.align_items == "flex-start"  # not stretched across the panel
    picture.clear()
    assert shown(picture.hint) and not shown(picture.image) and picture.value == b""


@pytest.mark.slow
def test_panels_work_with_ipywidgets_7(tmp_path_factory):
    """The panel tests (every file in tests/ui but the slow ones) again, in a process that
    imports ipywidgets 7.7 instead of 8; the visibility checks among them by name."""
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
                          "-rA", str(REPO / "tests" / "ui")], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "no tests ran" not in run.stdout
    passed = {line.split("::")[-1].split()[0] for line in run.stdout.splitlines() if line.startswith("PASSED ")}
    assert set(VISIBILITY_TESTS) <= passed, sorted(set(VISIBILITY_TESTS) - passed)


def test_on_and_off_as_booleans_become_the_words_in_the_panels(ui_config):
    """A dict or a setting from Python with True/False (what YAML makes of on/off, yes/no) shows
    and validates as the word."""
    from nb_finetune.ui import ModelPanel
    ui_config["train"] |= {"gradient_checkpointing": False, "cpu_kernels": False}
    panel = ModelPanel(config=ui_config)
    control = next(f for f in panel.forms if "train.gradient_checkpointing" in f.controls
                   ).controls["train.gradient_checkpointing"]
    assert control.value == "no"
    panel.shared.set("train.gradient_checkpointing", True)
    panel.shared.set("train.liger_kernel", False)
    assert control.value == "yes" and panel.shared.problems() == []
    cfg = panel.shared.config()
    assert (cfg.train.gradient_checkpointing, cfg.train.cpu_kernels, cfg.train.liger_kernel) == ("yes", "off", "off")
