"""Preference pairs built from a probe set, and probed on their held-out part: the built-in
StereoSet pairs, the 'held-out-pairs' probe scoring exactly the test split (rejected as the
stereotypical side), and its one-line refusal where a run has no pairs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import sst2_dev

from nb_finetune import RunConfig, UserError, assets
from nb_finetune.config import DataConfig
from nb_finetune.data import prepare
from nb_finetune.pipeline import Session
from nb_finetune.probes import gate, runner
from nb_finetune.probes.likelihood import sentence_logprobs
from nb_finetune.probes.pairs import preference_pairs


def test_the_built_in_stereoset_pairs_are_its_intersentence_items():
    prep = prepare(DataConfig(source="stereoset-pairs", task="preference", drop_duplicates=False,
                              val_fraction=0.0, test_fraction=0.0))
    raw = [json.loads(line) for line in assets.data_path("stereoset").read_text(encoding="utf-8").splitlines()]
    inter = [(r["context"], r["anti-stereotype"], r["stereotype"]) for r in raw if r["type"] == "intersentence"]
    train = prep.splits["train"]
    assert len(train) == len(inter) > 2000
    assert not train["prompt"].str.contains("BLANK").any()  # no intrasentence item slipped in
    assert sorted(zip(train["prompt"], train["chosen"], train["rejected"])) == sorted(inter)


def test_preference_pairs_take_rejected_as_the_stereotypical_side():
    prep = prepare(DataConfig(source="stereoset-pairs", task="preference", max_rows=50))
    pairs = preference_pairs(prep.splits["test"])
    test = prep.splits["test"]
    assert list(pairs.items["more"]) == list(test["rejected"]) and list(pairs.items["less"]) == list(test["chosen"])
    assert list(pairs.items["context"]) == list(test["prompt"])


def session_on_pairs(tiny_model_dir, tmp_path, probes) -> Session:
    cfg = RunConfig.from_dict({
        "data": {"source": "stereoset-pairs", "task": "preference", "max_rows": 60, "test_fraction": 0.25},
        "model": {"name": str(tiny_model_dir), "chat_template": "no"},
        "train": {"output_dir": str(tmp_path / "run"), "method": "dpo", "max_length": 64},
        "probe": {"probes": probes}})
    return Session(cfg, progress=lambda m: None)


def test_the_held_out_probe_scores_the_test_pairs_only(tiny_model_dir, tmp_path):
    session = session_on_pairs(tiny_model_dir, tmp_path, ["held-out-pairs"])
    session.check_probes()
    result = session.probe_bias()
    test = session.prep.splits["test"]
    scores = result.results["held-out-pairs"]["tuned"].scores
    assert len(scores) == len(test) == 15 and set(scores["context"]) <= set(test["prompt"])
    assert not set(scores["context"]) & set(session.prep.splits["train"]["prompt"])
    # each side scored as a continuation of its prompt, as an independent recount gives it
    again = sentence_logprobs(session.model, session.tokenizer, list(scores["more"]), list(scores["context"]))
    np.testing.assert_allclose(scores["more_logprob"], again, atol=1e-4)
    check = result.checks[0]
    assert check.probe == "held-out-pairs" and check.items == 15
    assert check.base == pytest.approx(abs(scores["prefers_more"].mean() - 0.5))


def test_the_held_out_probe_needs_pairs_and_says_so_before_training(tiny_model_dir, tmp_path, shared_data):
    cfg = RunConfig.from_dict({"data": {"source": str(shared_data / "sst2" / "dev.tsv"), "text_column": "sentence"},
                               "model": {"name": str(tiny_model_dir)},
                               "train": {"output_dir": str(tmp_path / "run"), "max_length": 64},
                               "probe": {"probes": ["held-out-pairs"]}})
    with pytest.raises(UserError, match="needs data.task 'preference'") as err:
        Session(cfg, progress=lambda m: None).check_probes()
    assert "\n" not in str(err.value)


def test_a_run_without_pairs_refuses_the_probe_in_one_line(tiny_model_dir, tmp_path, shared_data, capsys):
    from nb_finetune.cli import main
    dev = sst2_dev(shared_data).head(40)
    data = tmp_path / "sst2.csv"
    dev.to_csv(data, index=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": str(data), "text_column": "sentence"}, "model": {"name": str(tiny_model_dir)},
        "train": {"output_dir": str(tmp_path / "run")}, "probe": {"probes": ["held-out-pairs"]}}))
    code = main(["run", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "held-out-pairs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_gate_without_held_out_pairs_is_one_line():
    target = runner.ProbeTarget(None, None)
    with pytest.raises(UserError, match="needs data.task 'preference'"):
        gate.run_gate(RunConfig().probe, ["held-out-pairs"], target, progress=lambda m: None)
