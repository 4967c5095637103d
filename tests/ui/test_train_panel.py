"""The train panel: Start and Stop on a background thread with a live plot, errors in the
panel, Colab's foreground mode where an interrupt is the Stop, and the plain-words diagnosis."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from conftest import browser_lab


def test_colab_runs_training_in_the_foreground(monkeypatch, ui_config):
    import types

    from nb_finetune.ui import TrainPanel
    assert not TrainPanel(config=ui_config).foreground  # here: a background thread
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    panel = TrainPanel(config=ui_config)
    assert panel.foreground and panel.stop_button.disabled and "interrupt the cell" in panel.mode.value


def test_train_panel_plots_live_stops_on_click_and_keeps_checkpoint_and_history(ui_config, sst2_120, capfd):
    from nb_finetune.ui import TrainPanel
    ui_config["train"].update(max_steps=400, eval_steps=3)
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=False)
    empty = bytes(panel.plot.value)
    panel.start_button.click()
    panel.start_button.click()  # a second click while running starts nothing
    assert panel.start_button.disabled and not panel.stop_button.disabled
    redrawn = browser_lab.wait_until(lambda: panel.redraws >= 3 and bytes(panel.plot.value) != empty, 120, 0.05)
    assert redrawn, panel.error.value
    assert threading.active_count() >= 2 and panel.running
    assert "tokens/s" in panel.progress_text.value and "eta" in panel.progress_text.value
    panel.stop_button.click()
    assert panel.wait(120)
    r = panel.result
    assert panel.error.value == "", panel.error.value
    assert r.stopped and r.global_step < 400
    assert r.last_checkpoint is not None and r.last_checkpoint.is_dir()
    history = Path(ui_config["train"]["output_dir"]) / "history.csv"
    assert history.is_file() and "stopped at step" in panel.outcome.value
    assert not panel.start_button.disabled and panel.stop_button.disabled
    # One run only: one history, with each step once.
    assert r.history["step"].is_unique
    assert len([t for t in threading.enumerate() if t.name == "nb_finetune-train"]) == 0
    # Nothing printed from the training thread (it would land in whichever cell is running).
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_training_errors_appear_in_the_train_panel(ui_config, sst2_120, tmp_path):
    from nb_finetune.ui import TrainPanel
    ui_config["model"]["name"] = str(tmp_path / "no-such-model")
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=False)
    panel.start_button.click()
    assert panel.wait(60)
    assert "no-such-model" in panel.error.value
    assert not panel.start_button.disabled and not panel.running


def test_foreground_training_treats_an_interrupt_as_stop(ui_config, sst2_120, monkeypatch):
    """Colab's mode: training on the calling thread; a KeyboardInterrupt is the Stop."""
    from nb_finetune.ui import TrainPanel, train_panel
    ui_config["train"].update(max_steps=400, save_steps=2)
    calls = []
    original = train_panel.PanelProgress.on_log

    def interrupt_on_fifth(self, row, history):
        original(self, row, history)
        calls.append(threading.current_thread().name)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_panel.PanelProgress, "on_log", interrupt_on_fifth)
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=True)
    assert panel.stop_button.disabled and "interrupt" in panel.mode.value
    panel.start_button.click()  # returns when training has ended
    assert set(calls) == {threading.current_thread().name}
    assert panel.result.stopped and panel.result.global_step == 5
    assert panel.result.last_checkpoint.name == "checkpoint-5"
    assert not panel.running and not panel.start_button.disabled


def test_diagnosis_reads_the_curves():
    """What the panel writes under its plot, from the history alone."""
    import numpy as np
    import pandas as pd

    from nb_finetune.training import HISTORY_COLUMNS, diagnose

    def history(train, val, every=5):
        rows = [{c: np.nan for c in HISTORY_COLUMNS} | {"step": i + 1, "train_loss": v} for i, v in enumerate(train)]
        for j, v in enumerate(val):
            rows[(j + 1) * every - 1]["val_loss"] = v
        return pd.DataFrame(rows)

    falling = np.linspace(2.0, 0.2, 30)
    assert diagnose(history(falling, [1.5, 1.0, 0.8, 0.9, 1.1, 1.3])).startswith("over-fitting")
    assert "step 15" in diagnose(history(falling, [1.5, 1.0, 0.8, 0.9, 1.1, 1.3]))
    assert diagnose(history(np.full(30, 2.3) + 0.01 * np.sin(np.arange(30)), [2.3, 2.31, 2.29, 2.3]
                            )).startswith("under-fitting")
    assert diagnose(history(falling, [1.5, 1.0, 0.8, 0.6, 0.5, 0.4])).startswith("learning")
    assert diagnose(history(falling[:1], [])).startswith("too early")


def test_a_panel_clicked_during_training_gets_its_own_messages_and_none_of_training(ui_config, sst2_120):
    """The Data panel loads while the Train panel's run goes on on its thread: every message of
    the training thread reaches the Train panel, none the Data panel, and the Data panel's own
    messages reach it."""
    from nb_finetune.ui import DataPanel, Shared, TrainPanel
    ui_config["train"].update(max_steps=400, eval_steps=3)
    shared = Shared(ui_config, sst2_120)
    train, data = TrainPanel(shared, foreground=False), DataPanel(shared)
    heard: dict[str, list] = {"train": [], "data": []}

    def recording(name, say):
        def said(text):
            heard[name].append((threading.current_thread().name, text))
            say(text)
        return said

    train.say, data.say = recording("train", train.say), recording("data", data.say)
    train.start_button.click()
    assert browser_lab.wait_until(lambda: train.redraws >= 2, 120, 0.05), train.error.value
    data.load_button.click()
    assert train.running, "the click came after training ended"
    assert data.error.value == "", data.error.value
    train.stop_button.click()
    assert train.wait(120) and train.error.value == "", train.error.value
    threads = {name: {thread for thread, _ in said} for name, said in heard.items()}
    assert threads == {"train": {"nb_finetune-train", "MainThread"}, "data": {"MainThread"}}
    assert [t for t in heard["data"] if "loading data" in t[1]], heard["data"]
    after_click = [text for thread, text in heard["train"] if thread == "nb_finetune-train"]
    assert any("peak memory measured" in text for text in after_click)  # said once training ended
    assert any("loading model" in text for text in after_click)
