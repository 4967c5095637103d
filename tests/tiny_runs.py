"""Tiny real runs for the runs, Runs panel, fault and browser tests: configs on the tiny llama over
SST-2 rows, and a callback that asks a run to stop at a step."""
from __future__ import annotations

import threading
from pathlib import Path

import yaml
from conftest import sst2_dev

from nb_finetune.training.progress import Callback


def sst2_csv(tmp_path, shared_data):
    """80 SST-2 rows, 40 of each class, as a CSV file."""
    path = tmp_path / "sst2.csv"
    sst2_dev(shared_data).groupby("label").head(40).to_csv(path, index=False)
    return path


def write_config(tmp_path, model_dir, data, **train) -> str:
    """A run config on the tiny llama writing to tmp_path/runs/demo; `train` overrides its train section."""
    raw = {"data": {"source": str(data), "text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
           "model": {"name": str(model_dir), "lora_r": 4, "lora_alpha": 8},
           "train": {"output_dir": str(tmp_path / "runs" / "demo"), "max_steps": 6, "batch_size": 4,
                     "eval_steps": 3, "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3} | train,
           "eval": {"num_samples": 0, "baselines": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def tiny_config(root: Path, model_dir: Path, **train) -> dict:
    """The tiny llama on SST-2 classification: 8 steps, validation every 4; `train` overrides."""
    return {"data": {"task": "classification", "label_names": {"0": "negative", "1": "positive"}},
            "model": {"name": str(model_dir), "lora_r": 4, "lora_alpha": 8},
            "train": {"output_dir": str(root / "run"), "max_steps": 8, "batch_size": 4, "eval_steps": 4,
                      "save_steps": 4, "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3} | train,
            "eval": {"num_samples": 1, "max_new_tokens": 2, "max_test_rows": 12}}


class StopAt(Callback):
    """Sets `stop` once a logged step reaches `step`, as the Stop button does."""

    def __init__(self, stop: threading.Event, step: int):
        self.stop, self.step = stop, step

    def on_log(self, row, history):
        if row["step"] >= self.step:
            self.stop.set()
