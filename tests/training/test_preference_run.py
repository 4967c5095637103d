"""A preference run end to end on the tiny llama, from the command line: DPO and ORPO train on
pairs of real SST-2 sentences, log their rewards, and are evaluated on held-out pairs against
the base; and the diagnosis reads DPO's failure modes from a history."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import SUBPROCESS_ENV, sst2_dev

from nb_finetune import RunConfig
from nb_finetune.training.diagnosis import diagnose


@pytest.fixture
def pairs_file(shared_data, tmp_path):
    dev = sst2_dev(shared_data)
    pos, neg = dev[dev.label == "1"].sentence.head(30), dev[dev.label == "0"].sentence.head(30)
    path = tmp_path / "pairs.jsonl"
    pd.DataFrame({"prompt": [f"Write a positive review sentence ({i})." for i in range(30)], "chosen": pos.values,
                  "rejected": neg.values}).to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_from_the_command_line(tiny_model_dir, pairs_file, tmp_path, method):
    out = tmp_path / method
    cfg = RunConfig.from_dict({
        "data": {"source": str(pairs_file), "task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
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


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_on_a_4bit_base(tiny_model_dir, pairs_file, tmp_path, method):
    """QLoRA: bitsandbytes' 4-bit base on the CPU, the adapter trained by DPO (its reference the
    same 4-bit base with the adapter off) or ORPO; the rewards are logged and the adapter saved."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from nb_finetune.pipeline import Session
    cfg = RunConfig.from_dict({
        "data": {"source": str(pairs_file), "task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8, "quantization": "4bit"},
        "train": {"output_dir": str(tmp_path / method), "method": method, "max_steps": 2, "batch_size": 4,
                  "eval_steps": 2, "logging_steps": 1, "max_length": 96, "learning_rate": 1e-3}})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data()
    s.load_model()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in s.model.modules()) == 14  # 2 blocks x 7 linear layers
    result = s.train()
    assert result.global_step == 2 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.history["train_loss"].map(np.isfinite).all()
    assert result.history["reward_margin"].notna().all() and result.history["val_reward_accuracy"].notna().any()


def history(margins, chosen, rejected, logp_chosen):
    n = len(margins)
    return pd.DataFrame({"step": range(1, n + 1), "train_loss": np.linspace(0.7, 0.5, n), "val_loss": np.nan,
                         "reward_margin": margins, "reward_chosen": chosen, "reward_rejected": rejected,
                         "logp_chosen": logp_chosen})


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


def test_diagnosis_names_margins_that_grow_while_both_rewards_fall():
    h = history(np.linspace(0, 2, 8), np.linspace(0, -3, 8), np.linspace(0, -5, 8), np.full(8, -40.0))
    assert diagnose(h).startswith("preference (training pairs): the margin grew")


def test_diagnosis_reads_the_failure_on_validation_pairs_too():
    """Training rewards that look healthy, validation rewards that both fall while the margin
    grows (as a 12-step SmolLM2 run showed): the validation side is named."""
    h = history(np.linspace(0, 1, 8), np.linspace(0, 0.4, 8), np.linspace(0, -0.6, 8), np.linspace(-40, -36, 8))
    val = {"val_reward_margin": [0.03, 0.09, 0.13], "val_reward_chosen": [-0.02, -0.11, -0.17],
           "val_reward_rejected": [-0.05, -0.20, -0.30], "val_logp_chosen": [-40.0, -41.0, -42.0]}
    for column, values in val.items():
        h[column] = np.nan
        h.loc[[1, 4, 7], column] = values
    assert diagnose(h).startswith("preference (validation pairs): the margin grew (0.030 -> 0.130)")


def test_diagnosis_names_chosen_log_probabilities_collapsing():
    h = history(np.linspace(0, 1, 8), np.linspace(0, 0.5, 8), np.linspace(0, -0.5, 8), np.linspace(-40, -120, 8))
    assert "collapsed" in diagnose(h)


def test_diagnosis_of_a_healthy_preference_run_is_the_usual_one():
    h = history(np.linspace(0, 1, 8), np.linspace(0, 0.4, 8), np.linspace(0, -0.6, 8), np.linspace(-40, -36, 8))
    assert diagnose(h).startswith("learning")
