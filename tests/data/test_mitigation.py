"""Data-side mitigations: counterfactual augmentation and reweighting on real SST-2 rows
(training split only, reported). The generation-time word filter: tests/probes/test_filter.py."""
from __future__ import annotations

import csv

import pandas as pd
import pytest
from conftest import sst2_dev

from nb_finetune.config import RunConfig
from nb_finetune.data import mitigation
from nb_finetune.errors import ConfigError, UserError


def test_swap_terms_keeps_case_and_whole_words():
    mapping = mitigation.swap_map(mitigation.GENDER_TERMS)
    assert mitigation.swap_terms("He told his Mother; the heater hummed.", mapping) == \
        "She told her Father; the heater hummed."


def test_counterfactual_augmentation_touches_only_the_training_split(shared_data, tmp_path):
    path = tmp_path / "sst2.tsv"
    frame = sst2_dev(shared_data).head(300)
    frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE)
    base = {"source": str(path), "text_column": "sentence", "label_names": {"0": "negative", "1": "positive"}}
    from nb_finetune.data import prepare
    plain = prepare(RunConfig.from_dict({"data": base}).data)
    mitigated = prepare(RunConfig.from_dict({"data": base | {"counterfactual": True}}).data)
    mapping = mitigation.swap_map(mitigation.GENDER_TERMS)
    train = plain.splits["train"]
    mentions = train["text"].map(lambda t: mitigation.swap_terms(t, mapping) != t)
    assert mentions.sum() > 5  # real reviews mention he/she/man/woman
    assert len(mitigated.splits["train"]) == len(train) + mentions.sum()
    for name in ("validation", "test"):
        assert mitigated.splits[name].equals(plain.splits[name])
    row = mitigated.report.checks.set_index("check").loc["counterfactual copies added to train"]
    assert row["count"] == mentions.sum()
    copies = mitigated.splits["train"].iloc[len(train):]
    assert list(copies["text"]) == [mitigation.swap_terms(t, mapping) for t in train["text"][mentions]]
    assert list(copies["label"]) == list(train["label"][mentions])


def test_reweighting_balances_groups_and_reports_it():
    frame = pd.DataFrame({"text": ["she ran"] * 3 + ["he ran"] * 9 + ["it ran"] * 4, "label": "a"})
    groups = mitigation.term_groups(frame, {"female": ["she"], "male": ["he"]})
    assert groups.value_counts().to_dict() == {"male": 9, "none": 4, "female": 3}
    named = groups != "none"
    out, effect = mitigation.reweight(frame[named], groups[named], seed=0)
    assert effect == {"male": (9, 9), "female": (3, 9)}
    assert out["text"].value_counts().to_dict() == {"he ran": 9, "she ran": 9}


def test_bad_mitigation_settings_are_named():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"data": {"counterfactual_terms": [["he"]], "reweight_groups": {"only": ["x"]}}})
    fields = {p.field for p in err.value.problems}
    assert fields == {"data.counterfactual_terms", "data.reweight_groups"}
    with pytest.raises(UserError, match="term list is empty"):
        mitigation.swap_map([])

