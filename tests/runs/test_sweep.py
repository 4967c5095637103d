"""A grid sweep from the command line and from Python: every combination trained and ranked,
pruning that stops a trailing run and says what it saved, Stop that ends the sweep, and
one-line errors for a bad grid."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tiny_runs import StopAt, sst2_csv, write_config

from nb_finetune import RunConfig, runs, sweep
from nb_finetune.cli import main
from nb_finetune.training.progress import Callback


@pytest.fixture
def sst2_file(tmp_path, shared_data):
    return sst2_csv(tmp_path, shared_data)


@pytest.mark.integration  # four whole jobs, through the command line
def test_a_2x2_sweep_trains_four_runs_and_ranks_them(tmp_path, tiny_model_dir, sst2_file, capsys):
    config = write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=4, eval_steps=2)
    assert main(["sweep", "--config", config, "--grid", "train.learning_rate=1e-3,3e-3",
                 "--grid", "model.lora_r=2,4"]) == 0
    out = capsys.readouterr().out
    found, skipped = runs.find_runs(tmp_path / "runs" / "demo-sweep")
    names = sorted(r.name for r in found)
    assert skipped == 0 and names == ["learning_rate=0.001,lora_r=2", "learning_rate=0.001,lora_r=4",
                                      "learning_rate=0.003,lora_r=2", "learning_rate=0.003,lora_r=4"]
    assert all(r.status == "finished" and r.record["training"]["steps"] == 4 for r in found)
    ranked = out.split("ranked by validation loss:")[1].strip().splitlines()[1:]
    losses = [runs.find(found, line.split()[0]).record["training"]["val_loss"] for line in ranked]
    assert len(losses) == 4 and losses == sorted(losses)
    baseline = runs.find(found, "learning_rate=0.001,lora_r=2")
    changed = runs.table(found, baseline).set_index("run")["changed"]
    assert changed["learning_rate=0.003,lora_r=4"] == "lora_r=4, learning_rate=0.003"


def test_pruning_stops_a_run_that_trails_the_best_and_says_what_it_saved(tmp_path, tiny_model_dir, sst2_file):
    cfg = RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=6, eval_steps=3))
    lines = []
    result = sweep.run_sweep(cfg, {"train.learning_rate": [1e-2, 1e-7]}, progress=lines.append, prune=0.005)
    good, bad = (runs.find(runs.find_runs(result.folder)[0], f"learning_rate={lr}") for lr in (0.01, 1e-07))
    assert good.status == "finished" and good.record["training"]["steps"] == 6
    assert bad.status == "pruned" and bad.record["training"]["steps"] == 3
    assert result.pruned == [bad.folder] and result.pruned_steps == 3
    assert any("pruned at step 3" in line and "3 steps saved" in line for line in lines)


def test_stop_ends_the_current_run_and_the_sweep(tmp_path, tiny_model_dir, sst2_file):
    cfg = RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=6))
    stop = threading.Event()
    result = sweep.run_sweep(cfg, {"model.lora_r": [2, 4, 8]}, stop, lambda m: None, callbacks=[StopAt(stop, 2)])
    assert result.stopped and len(result.runs) == 1
    (only,), _ = runs.find_runs(result.folder)
    assert only.status == "stopped" and only.record["training"]["steps"] == 2


class CrashSecondRun(Callback):
    def __init__(self):
        self.runs = 0

    def on_train_begin(self, info):
        self.runs += 1

    def on_log(self, row, history):
        if self.runs == 2:
            raise RuntimeError("out of disk")


def test_a_run_that_fails_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir, sst2_file):
    cfg = RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=3))
    result = sweep.run_sweep(cfg, {"model.lora_r": [2, 4, 8]}, progress=lambda m: None, callbacks=[CrashSecondRun()])
    status = runs.table(runs.find_runs(result.folder)[0]).set_index("run")["status"].to_dict()
    assert status == {"lora_r=2": "finished", "lora_r=4": "failed", "lora_r=8": "finished"}
    assert [(Path(f).name, e) for f, e in result.failed] == [("lora_r=4", "RuntimeError: out of disk")]
    assert len(result.runs) == 2 and not result.stopped


@pytest.mark.parametrize("grid,words", [
    ("train.learning_rat=1e-4,3e-4", "train.learning_rat is not a setting"),
    ("learning_rate", "give a setting and its values"),
    ("model.lora_r=8,big", "model.lora_r='big': a value of type int"),
])
def test_a_bad_grid_is_one_line_and_trains_nothing(grid, words, tmp_path, tiny_model_dir, sst2_file, capsys):
    config = write_config(tmp_path, tiny_model_dir, sst2_file)
    assert main(["sweep", "--config", config, "--grid", grid]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
