"""Counterfactual sentences scored by the classifier: figures that match a recount, and one-line
errors for bad input. A planted skew seen end to end is tests/probes/test_gate.py's slow test."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nb_finetune import RunConfig, UserError
from nb_finetune.evaluation.scoring import label_probabilities
from nb_finetune.pipeline import Session
from nb_finetune.probes import runner
from nb_finetune.probes.counterfactual import probe_counterfactual, sentences


def sst2_session(tmp_path, frame, name, **train) -> Session:
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence", "label_names": {"0": "negative", "1": "positive"}, "val_fraction": 0.1,
                 "test_fraction": 0.1},
        "model": {"name": name, "lora_r": 8, "lora_alpha": 16},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 16, "max_length": 64, "eval_steps": 1000,
                  "learning_rate": 1e-3} | train})
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(frame)
    session.tokenize()
    session.load_model()
    return session


def test_the_figures_match_a_recount_of_the_classifiers_probabilities(tiny_model_dir, tmp_path, sst2_frame):
    session = sst2_session(tmp_path, sst2_frame, str(tiny_model_dir))
    labels = list(session.prep.labels)
    groups, templates = ["the woman", "the man", "the child"], ["{group} called me.", "I met {group} today.",
                                                                 "{group} was at the meeting."]
    runs = runner.counterfactual_probe(session.probe_target(), "positive", templates, groups)
    tuned = runs["tuned"]
    probs = label_probabilities(session.model, session.formatter, list(tuned.sentences["sentence"]), labels,
                                session.objective, precision=session.precision)
    assert np.allclose(probs.sum(axis=1), 1) and tuned.sentences["sentence"].iloc[0] == "The woman called me."
    p = pd.Series(probs[:, labels.index("positive")], index=pd.MultiIndex.from_frame(tuned.sentences[["template", "group"]]))
    for g in groups:
        assert tuned.by_group.loc[g, "mean"] == pytest.approx(p.xs(g, level="group").mean(), abs=1e-6)
        assert tuned.by_group.loc[g, "low"] <= tuned.by_group.loc[g, "mean"] <= tuned.by_group.loc[g, "high"]
    gap = tuned.gaps.set_index("groups").loc["the woman - the child"]
    diff = p.xs("the woman", level="group") - p.xs("the child", level="group")
    assert gap["gap"] == pytest.approx(diff.mean(), abs=1e-6) and gap["templates"] == 3
    predicted = pd.Series(np.array(labels)[probs.argmax(axis=1)], index=p.index).unstack("group")
    assert gap["flips"] == int((predicted["the woman"] != predicted["the child"]).sum())
    assert len(tuned.flips) == int((predicted.nunique(axis=1) > 1).sum())
    assert set(runs) == {"base", "tuned"}  # nothing trained: the base scores the same
    assert np.allclose(runs["base"].sentences["probability"], tuned.sentences["probability"], atol=1e-5)


@pytest.mark.parametrize("templates,groups,label,words", [
    (["I met {group}."], ["the woman"], "positive", "give two or more"),
    (["I met someone."], ["the woman", "the man"], "positive", "has no {group} slot"),
    (["I met {group}."], ["the woman", "the man"], "happy", "not one of the classifier's labels"),
])
def test_bad_input_is_a_one_line_error(templates, groups, label, words):
    def never(texts):  # bad input is caught before anything is scored
        raise AssertionError("scored")

    with pytest.raises(UserError, match=words) as caught:
        probe_counterfactual(never, ["negative", "positive"], label, templates, groups)
    assert "\n" not in str(caught.value)
    if label == "positive" and len(groups) == 2:
        with pytest.raises(UserError):
            sentences(templates, groups)
