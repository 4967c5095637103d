"""A preference run end to end from the command line: DPO and ORPO on the tiny llama over pairs
of real SST-2 sentences, rewards logged and held-out pairs evaluated against the base; and the
debias-dpo preset, shortened, probed on its held-out pairs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import SUBPROCESS_ENV

from nb_finetune import RunConfig


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_from_the_command_line(tiny_model_dir, sst2_pairs_file, tmp_path, method):
    out = tmp_path / method
    cfg = RunConfig.from_dict({
        "data": {"source": str(sst2_pairs_file), "task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": str(out), "method": method, "max_steps": 4, "batch_size": 4, "eval_steps": 2,
                  "logging_steps": 1, "max_length": 96, "learning_rate": 1e-3},
        "eval": {"num_samples": 1, "max_new_tokens": 4}}).save(tmp_path / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "nb_finetune.cli", "run", "--config", str(cfg)],
                          capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preference_accuracy" in done.stdout
    metrics = pd.read_csv(out / "test_metrics.csv", index_col="model")
    assert list(metrics.index) == ["tuned", "base"] and (metrics["pairs"] == 6).all()
    assert metrics["preference_accuracy"].between(0, 1).all()
    assert (metrics["accuracy_low"] <= metrics["preference_accuracy"]).all()
    assert (metrics["margin_low"] <= metrics["mean_margin"]).all() and (metrics["mean_margin"] <= metrics["margin_high"]).all()
    history = pd.read_csv(out / "history.csv")
    for column in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "val_reward_margin"):
        assert history[column].notna().any(), column
    val = history.dropna(subset=["val_loss"])
    assert len(val) == 2 and np.allclose(val["val_accuracy"], val["val_reward_accuracy"])
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["train"]["method"] == method and report["data_report"]["chosen_longer"] is not None
    assert len(pd.read_csv(out / "samples.csv")) == 1


@pytest.mark.slow
def test_the_debias_preset_probes_its_held_out_pairs_beside_the_general_loss(tmp_path):
    """`nb-finetune run --preset debias-dpo`, shortened: StereoSet pairs, DPO, the probe on the
    held-out pairs only, the gate's verdict, and the general-set loss of base and tuned."""
    out = tmp_path / "debias"
    sets = {"data.max_rows": 80, "train.max_steps": 3, "train.eval_steps": 3, "train.output_dir": str(out),
            "eval.general_rows": 6, "eval.num_samples": 1, "eval.max_new_tokens": 4, "train.max_length": 64}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run([sys.executable, "-m", "nb_finetune.cli", "run", "--preset", "debias-dpo", *args],
                          capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode in (0, 3), done.stderr[-2000:]  # 3: the gate failed, a verdict, not an error
    report = json.loads((out / "report.json").read_text())
    test_pairs = report["data_report"]["split_sizes"]["test"]
    check = report["bias_gate"]["checks"][0]
    assert check["probe"] == "held-out-pairs" and check["items"] == test_pairs == 20
    assert ("bias gate failed" if done.returncode == 3 else "bias gate passed") in done.stdout
    metrics = {row["model"]: row for row in report["test_metrics"]}
    for name in ("tuned", "base"):
        assert metrics[name]["pairs"] == test_pairs
        assert metrics[name]["general_loss_low"] <= metrics[name]["general_loss"] <= metrics[name]["general_loss_high"]
    assert metrics["tuned"]["general_loss"] != metrics["base"]["general_loss"]
