"""Preference runs on the tiny llama: DPO and ORPO on a 4-bit base, on pairs of real SST-2
sentences; and the diagnosis reads DPO's failure modes from a history. Whole preference runs
from the command line are in tests/integration/test_preference_runs.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nb_finetune import RunConfig
from nb_finetune.training.diagnosis import diagnose


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_on_a_4bit_base(tiny_model_dir, sst2_pairs_file, tmp_path, method):
    """QLoRA: bitsandbytes' 4-bit base on the CPU, the adapter trained by DPO (its reference the
    same 4-bit base with the adapter off) or ORPO; the rewards are logged and the adapter saved."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from nb_finetune.pipeline import Session
    cfg = RunConfig.from_dict({
        "data": {"source": str(sst2_pairs_file), "task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
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
