"""Evaluation through a session, on a tiny random llama with the real SmolLM2 tokenizer: the
tuned model beside the base and the majority class, loss and perplexity for completions, and
the base's results kept across trainings."""
import math
import platform

import numpy as np
import pytest
from conftest import alpaca_raw, prepared_session, tiny_run_config

from nb_finetune.pipeline import Session


def test_evaluate_reports_baselines(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    from contextlib import contextmanager

    from nb_finetune import hardware, kernels
    from nb_finetune.kernels import allocator
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path, max_steps=2), sst2_frame)
    s.train()
    entered, seen = [], []  # freed_memory_kept's answers while it is entered; what each forward pass saw
    real_kept = allocator.freed_memory_kept

    @contextmanager
    def kept(enabled=True):
        with real_kept(enabled) as applied:
            entered.append(applied)
            try:
                yield applied
            finally:
                entered.pop()

    monkeypatch.setattr(allocator, "freed_memory_kept", kept)
    hook = s.model.register_forward_pre_hook(lambda module, args: seen.append(list(entered)))
    try:
        ev = s.evaluate()
    finally:
        hook.remove()
    # every batch of the tuned and the base model ran with the freed memory kept (glibc on a CPU,
    # train.cpu_kernels at its default, auto)
    assert s.cfg.train.cpu_kernels == "auto" and kernels.wanted("auto") == (not hardware.cuda_available())
    applies = platform.libc_ver()[0] == "glibc" and not hardware.cuda_available() and \
        not allocator.allocator_tuned_by_environment()
    assert len(seen) > 2 and all(state == [applies] for state in seen), seen[:3]
    assert not entered
    majority = s.prep.splits["train"]["label"].value_counts().index[0]
    assert list(ev.metrics.index) == ["tuned", "base", f"majority class ({majority})"]
    n_test = len(s.prep.splits["test"])
    assert ev.confusion.to_numpy().sum() == n_test
    share = (s.prep.splits["test"]["label"] == majority).mean()
    assert math.isclose(ev.metrics.iloc[2]["accuracy"], share)
    picked = ev.predictions["tuned_prediction"]
    assert math.isclose(ev.metrics.loc["tuned", "accuracy"], (picked == ev.predictions["reference"]).mean())
    assert list(ev.samples.columns) == ["prompt", "reference", "base", "tuned"] and len(ev.samples) == 1
    # the texts alone in the tables; the instruction they share once, in the result
    assert ev.instruction == s.formatter.instruction and ev.instruction
    from nb_finetune.render.tables import shorten
    assert ev.samples["prompt"].iloc[0] == shorten(s.prep.splits["test"]["text"].iloc[0], 120)
    out = s.write_outputs()
    for name in ("report.json", "test_metrics.csv", "confusion_matrix.csv", "samples.csv", "data_report.csv"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("task", ["classification", "completion"])
def test_evaluating_after_training_again_reuses_the_base_models_results(task, tiny_model_dir, tmp_path, sst2_frame,
                                                                       shared_data, monkeypatch):
    """The base (adapter off) gives the same test scores, loss and samples after every
    training: evaluated once, then reused, until the base, the tokens or the test rows change."""
    import pandas as pd

    from nb_finetune.evaluation import base_cache
    base_runs = []
    real_base = base_cache.as_base
    monkeypatch.setattr(base_cache, "as_base", lambda model: base_runs.append(1) or real_base(model))
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=2)
    frame = sst2_frame
    if task == "completion":
        cfg = cfg.with_overrides({"data.task": "completion", "data.text_column": "", "train.max_length": 96})
        frame = alpaca_raw(shared_data).iloc[:60]
    said = []
    s = Session(cfg, progress=said.append)
    s.prepare_data(frame)
    s.train()
    first = s.evaluate()
    assert len(base_runs) == 2  # the test set, then the samples
    s.reconfigure(cfg.with_overrides({"train.learning_rate": 3e-3, "model.lora_r": 8}))
    s.discard_training()
    s.train()
    again = s.evaluate()
    assert len(base_runs) == 2 and sum("from an earlier run" in m for m in said) == 2
    pd.testing.assert_series_equal(first.metrics.loc["base"], again.metrics.loc["base"])
    assert list(first.samples["base"]) == list(again.samples["base"])
    changed = "tuned_confidence" if task == "classification" else "tuned_loss"
    assert not np.allclose(first.predictions[changed], again.predictions[changed])  # a newly trained tuned model
    s.reconfigure(s.cfg.with_overrides({"eval.max_test_rows": 3}))
    s.evaluate()
    assert len(base_runs) == 4  # fewer test rows: the base runs again
    test_rows = s.prep.splits["test"]
    s.reconfigure(s.cfg.with_overrides({"eval.max_test_rows": 0, "data.seed": 7}))
    s.prepare_data()
    assert not s.prep.splits["test"].equals(test_rows)  # another split
    s.evaluate()
    assert len(base_runs) == 6  # other test rows: the base runs again
    fresh = Session(cfg, progress=said.append)
    fresh.prepare_data(frame)
    fresh.train()
    pd.testing.assert_series_equal(fresh.evaluate().metrics.loc["base"], first.metrics.loc["base"])
    assert len(base_runs) == 8  # a new session keeps nothing: computed again, the same


def test_completion_task_reports_loss_and_perplexity(tiny_model_dir, tmp_path, shared_data):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=3, max_length=96).with_overrides(
        {"data.task": "completion", "data.text_column": ""})
    s = prepared_session(cfg, alpaca_raw(shared_data).iloc[:60])
    s.train()
    ev = s.evaluate()
    assert list(ev.metrics.index) == ["tuned", "base"]
    for name in ("tuned", "base"):
        loss = ev.metrics.loc[name, "loss"]
        assert np.isfinite(loss) and ev.metrics.loc[name, "perplexity"] == pytest.approx(math.exp(loss))
    assert ev.errors["tuned_loss"].is_monotonic_decreasing
    assert len(ev.errors) == min(10, len(s.prep.splits["test"]))  # eval.worst_errors caps it at 10
