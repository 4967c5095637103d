"""The data stage: the report's checks, cleaning, the seeded stratified split, and data that
cannot be trained on at all."""

import pandas as pd
import pytest
from conftest import sst2_dev

from nb_finetune import UserError
from nb_finetune.config import DataConfig
from nb_finetune.data import normalize, prepare, split


def test_report_counts_duplicates_conflicts_and_leakage(shared_data):
    df = sst2_dev(shared_data).head(200)
    dup = df.iloc[:5]
    conflict = df.iloc[5:8].assign(label=lambda d: d["label"].map({"0": "1", "1": "0"}))
    messy = pd.concat([df, dup, conflict], ignore_index=True)
    messy.loc[len(messy)] = ["   ", "1"]
    cfg = DataConfig(text_column="sentence", seed=3)
    prep = prepare(cfg, messy)
    checks = prep.report.checks.set_index("check")["count"]
    assert checks["rows"] == 209
    assert checks["exact duplicates"] == 5
    assert checks["same text, conflicting labels"] == 3
    assert checks["empty text"] == 1
    assert checks["rows dropped (empty or duplicate)"] == 6
    # conflicting rows are not exact duplicates: they stay, and may leak across splits
    leaked = checks["leakage: validation texts also in train"] + checks["leakage: test texts also in train"]
    train = set(prep.splits["train"]["text"])
    assert leaked == sum(t in train for s in ("validation", "test") for t in prep.splits[s]["text"])
    assert "exact duplicates" in prep.report.summary()


def test_split_is_stratified_seeded_and_disjoint(shared_data):
    frame = normalize(sst2_dev(shared_data).head(300), DataConfig(text_column="sentence"))
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.2, seed=7)
    a, b = split(frame, cfg, "label"), split(frame, cfg, "label")
    for name in a:
        assert a[name].equals(b[name])
    assert sum(len(v) for v in a.values()) == 300
    overall = frame["label"].value_counts(normalize=True)
    for part in a.values():
        share = part["label"].value_counts(normalize=True)
        assert abs(share["1"] - overall["1"]) < 0.03
    c = split(frame, DataConfig(val_fraction=0.2, test_fraction=0.2, seed=8), "label")
    assert not c["test"].equals(a["test"])


def test_single_class_and_all_empty_text(shared_data):
    df = sst2_dev(shared_data).head(100)
    with pytest.raises(UserError, match="single class"):
        prepare(DataConfig(text_column="sentence"), df[df["label"] == "1"])
    with pytest.raises(UserError, match="text column is empty in every row"):
        prepare(DataConfig(text_column="sentence"), df.assign(sentence=""))


def test_class_too_rare_for_stratified_split(shared_data):
    df = sst2_dev(shared_data).head(100)
    rare = pd.concat([df, pd.DataFrame({"sentence": ["odd one", "odd two"], "label": ["2", "2"]})])
    with pytest.raises(UserError, match="class '2' has only 2 row"):
        prepare(DataConfig(text_column="sentence"), rare)
