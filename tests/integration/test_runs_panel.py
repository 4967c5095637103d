"""The Runs panel on real tiny runs made beforehand (the "earlier session"): the table with what
each run changed and how it ended, the curves overlaid, the config diff, loading a run's settings,
resuming a stopped run through the studio's Train tab, deleting after a confirmation, and a 2x2
sweep from the panel, pruned and ranked."""
from __future__ import annotations

import html
import re
import shutil
import threading
from pathlib import Path

import pytest
from conftest import PNG, sst2_dev
from tiny_runs import StopAt, tiny_config


@pytest.fixture(scope="module")
def frame(shared_data):
    return sst2_dev(shared_data).groupby("label").head(40).reset_index(drop=True)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_model_dir, frame) -> Path:
    """Three runs into one output_dir (so run, run-2, run-3), as a past session left them:
    learning rate 1e-3, then 3e-3, then 1e-3 stopped at step 5 (after a checkpoint at step 4)."""
    from nb_finetune import RunConfig
    from nb_finetune.pipeline import run
    root = tmp_path_factory.mktemp("runs")
    for lr, stop_at in ((1e-3, None), (3e-3, None), (1e-3, 5)):
        stop = threading.Event()
        cfg = RunConfig.from_dict(tiny_config(root, tiny_model_dir, learning_rate=lr))
        run(cfg, [StopAt(stop, stop_at)] if stop_at else [], stop, lambda m: None, frame)
    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{half a rec")  # a record cut off mid-write
    return root


@pytest.fixture
def folder(earlier, tmp_path) -> Path:
    """A copy of the earlier runs, for a test that changes them."""
    return Path(shutil.copytree(earlier, tmp_path / "runs"))


def rows(panel, table: str = "table") -> list[list[str]]:
    """An HTML table as shown: the cells of each row after the header, unescaped."""
    body = getattr(panel, table).value
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)] for row in body.split("<tr")[2:]]


def column(panel, name: str, table: str = "table") -> list[str]:
    header = re.findall(r"<th>(.*?)</th>", getattr(panel, table).value)
    return [row[header.index(name)] for row in rows(panel, table)]


def by_run(panel, name: str) -> dict:
    return dict(zip(column(panel, "run"), column(panel, name)))


def test_an_earlier_sessions_runs_in_a_new_panel(earlier, tiny_model_dir, tmp_path):
    from nb_finetune.ui import RunsPanel
    panel = RunsPanel(config=tiny_config(tmp_path, tiny_model_dir), folder=earlier)
    assert panel.error.value == "", panel.error.value
    assert "3 run(s)" in panel.count.value and "1 folder(s) skipped" in panel.count.value
    assert panel.baseline.value == "run"  # the oldest
    assert panel.selected.value == "run-3"  # the newest
    assert column(panel, "run") == ["run-3", "run-2", "run"]  # newest first
    assert by_run(panel, "status") == {"run": "finished", "run-2": "finished", "run-3": "stopped"}
    # Only the setting that differs from the baseline (output_dir aside: every run has its own).
    assert by_run(panel, "changed") == {"run": "-", "run-2": "learning_rate=0.003", "run-3": "-"}
    assert by_run(panel, "test_metric") == {"run": "accuracy", "run-2": "accuracy", "run-3": ""}  # stopped: no test
    assert all(float(v.replace(",", "")) > 0 for v in column(panel, "val_loss") + column(panel, "tokens_per_s"))

    panel.sort.value, panel.ascending.value = "val_loss", True
    losses = [float(v) for v in column(panel, "val_loss")]
    assert losses == sorted(losses) and len(losses) == 3

    # One colour per run, a line for training and one for validation, the change in the legend.
    assert set(panel.chosen.value) == {"run", "run-2", "run-3"} and panel.plot.value.startswith(PNG)
    ax = panel.figure.axes[0]
    assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == 6
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-2:] == ["training", "validation"] and "run-2 (learning_rate=0.003)" in legend
    assert len({line.get_color() for line in ax.get_lines()}) == 3
    panel.chosen.value = ("run-2",)
    assert len(panel.figure.axes[0].get_legend().get_texts()) == 3

    panel.selected.value = "run-2"
    assert "train.learning_rate" in panel.diff.value and "0.003" in panel.diff.value
    assert "output_dir" not in panel.diff.value  # every run has its own
    panel.selected.value = "run-3"
    assert "the same settings" in panel.diff.value
    panel.baseline.value = "run-2"  # the changed column follows the baseline
    assert by_run(panel, "changed")["run"] == "learning_rate=0.001"


def test_load_a_runs_config_and_resume_a_stopped_run_in_the_studio(folder, tiny_model_dir, tmp_path, frame):
    from nb_finetune.ui import Studio
    studio = Studio(tiny_config(tmp_path, tiny_model_dir, learning_rate=5e-4), data=frame, foreground=False)
    panel = studio.runs
    panel.folder.value = str(folder)
    assert "3 run(s)" in panel.count.value
    panel.selected.value = "run-2"
    assert panel.resume_button.disabled  # finished: nothing to resume
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    shared = studio.shared
    assert shared.get("train.learning_rate") == 3e-3 and shared.get("train.resume_from") == ""
    assert studio.evaluation.forms[0].controls["eval.max_test_rows"].value == 12

    panel.selected.value = "run-3"
    assert not panel.resume_button.disabled
    panel.resume_button.click()
    assert panel.error.value == "", panel.error.value
    assert shared.get("train.resume_from") == "last" and shared.get("train.output_dir") == str(folder / "run-3")
    assert shared.get("train.learning_rate") == 1e-3
    assert studio.tabs.selected_index == studio.panels.index(studio.train)
    assert "press Start in the Train tab" in panel.status.value

    studio.train.start_button.click()  # the resumed run goes on from step 4 to 8 in its own folder
    assert studio.train.wait(180), studio.train.error.value
    assert studio.train.error.value == "", studio.train.error.value
    assert studio.train.result.global_step == 8 and not studio.train.result.stopped
    assert not (folder / "run-4").exists()
    assert by_run(panel, "status")["run-3"] == "finished"  # the panel heard the Train tab


def test_delete_asks_first_and_removes_only_that_run(folder, tiny_model_dir, tmp_path):
    from nb_finetune.ui import RunsPanel
    panel = RunsPanel(config=tiny_config(tmp_path, tiny_model_dir), folder=folder)
    panel.selected.value = "run-2"
    panel.delete_button.click()
    question, yes, cancel = panel.confirm.children
    assert "run-2" in question.value and yes.description == "Yes, delete run-2" and cancel.description == "Cancel"
    cancel.click()
    assert panel.confirm.children == () and (folder / "run-2").is_dir()
    panel.delete_button.click()
    panel.confirm.children[1].click()
    assert panel.error.value == "", panel.error.value
    assert not (folder / "run-2").exists() and (folder / "run").is_dir() and (folder / "run-3").is_dir()
    assert "2 run(s)" in panel.count.value and column(panel, "run") == ["run-3", "run"]
    assert "run-2" not in panel.selected.options and "run-2" not in panel.chosen.options


def test_a_missing_folder_is_a_note_and_a_bad_grid_an_error(tiny_model_dir, tmp_path):
    from nb_finetune.ui import RunsPanel
    panel = RunsPanel(config=tiny_config(tmp_path / "nothing-yet", tiny_model_dir))
    assert panel.folder.value == str(tmp_path / "nothing-yet")  # the folder above train.output_dir
    assert "no folder" in panel.count.value and panel.error.value == ""
    assert panel.load_button.disabled and panel.resume_button.disabled and panel.delete_button.disabled
    assert not panel.plot.shown
    panel.grid.value = "train.learning_rat=1e-4,3e-4"
    panel.sweep_button.click()
    assert "learning_rat" in panel.error.value and not panel.sweeping
    panel.grid.value = ""
    panel.sweep_button.click()
    assert "one setting and its values per line" in panel.error.value


def test_a_2x2_sweep_from_the_panel_lists_each_run_and_ranks_them(tiny_model_dir, tmp_path, frame):
    from nb_finetune.ui import RunsPanel
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=4, eval_steps=2, save_steps=100)
    panel = RunsPanel(config=config, data=frame, foreground=False)
    seen = []
    panel.table.observe(lambda c: seen.append(len(panel.found)), names="value")
    panel.grid.value = "train.learning_rate=1e-3,3e-3\nmodel.lora_r=4,8"
    # A margin below zero prunes every run after the first at its first validation step: the
    # pruning path, whichever run learns fastest.
    panel.prune.value, panel.margin.value = True, -0.5
    panel.sweep_button.click()
    assert panel.sweep_button.disabled and not panel.stop_sweep_button.disabled
    assert panel.wait(600), panel.sweep_status.value
    assert panel.error.value == "", panel.error.value
    result = panel.sweep_result
    assert len(result.runs) == 4 and len(result.pruned) == 3 and result.pruned_steps == 6
    assert "4 run(s)" in panel.sweep_status.value and "3 pruned, 6 training steps saved" in panel.sweep_status.value
    assert {1, 2, 3, 4} <= set(seen)  # each run listed as it finished
    losses = [float(v) for v in column(panel, "val_loss", "ranked")]
    assert len(losses) == 4 and losses == sorted(losses)
    assert sorted(column(panel, "status", "ranked")) == ["finished", "pruned", "pruned", "pruned"]
    names = {f"learning_rate={lr},lora_r={r}" for lr in ("0.001", "0.003") for r in (4, 8)}
    assert set(column(panel, "run", "ranked")) == names
    assert set(column(panel, "run")) == {f"run-sweep/{name}" for name in names}  # the Runs table lists them
    assert not panel.sweep_button.disabled and panel.stop_sweep_button.disabled
