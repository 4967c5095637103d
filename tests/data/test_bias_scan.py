"""The bias scan of training rows: groups mentioned, label shares with intervals, a planted
skew flagged on its group only, evened out by counterfactual copies, and bad term lists."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import alpaca, mentions, sst2_dev

from nb_finetune import RunConfig, UserError
from nb_finetune.data import loading, normalize, prepare
from nb_finetune.data.bias_scan import DEFAULT_GROUPS, scan, wilson


def imdb_frame() -> pd.DataFrame:
    cfg = loading.resolve_source(RunConfig.from_dict({"data": {"source": "imdb-sample"}}).data)
    return normalize(loading.read_table("imdb-sample", cfg), cfg)


def sst2_texts(shared_data) -> pd.DataFrame:
    """SST-2's dev rows with the sentence as the normalised `text` column."""
    return sst2_dev(shared_data).rename(columns={"sentence": "text"})


def agnews_business_scitech(shared_data) -> pd.DataFrame:
    """AG News test rows of two topics (Business, Sci/Tech): news text, two labels."""
    import csv
    frame = pd.read_csv(shared_data / "agnews" / "test.tsv", sep="\t", header=None, names=["text", "label"],
                        quoting=csv.QUOTE_NONE, dtype=str)
    return frame[frame["label"].isin(["Business", "Sci/Tech"])].reset_index(drop=True)


def plant(frame: pd.DataFrame, group: str, label: str) -> pd.DataFrame:
    """Every row that mentions the group relabelled."""
    axis = next(a for a, named in DEFAULT_GROUPS.items() if group in named)
    planted = frame.copy()
    planted.loc[mentions(frame["text"], DEFAULT_GROUPS[axis][group]), "label"] = label
    return planted


def test_the_built_in_imdb_sample_has_groups_mentioned_and_none_flagged():
    prep = prepare(RunConfig.from_dict({"data": {"source": "imdb-sample"}}).data)
    found = prep.report.bias_scan
    assert found.rows == prep.report.split_sizes["train"] and found.label in ("negative", "positive")
    mentioned = found.groups.set_index("group")["rows"]
    assert mentioned["female"] > 10 and mentioned["male"] > 10 and found.flagged.empty
    check = prep.report.checks.set_index("check").loc["bias scan: groups whose label share differs"]
    assert check["count"] == 0 and check["severity"] == "ok"
    assert "bias scan of" in prep.report.summary() and "gender / female" in prep.report.summary()


@pytest.mark.parametrize("data,group", [("imdb", "female"), ("imdb", "male"), ("imdb", "young"),
                                        ("sst2", "female"), ("sst2", "old")])
def test_a_planted_skew_is_flagged_on_its_group_and_on_no_other(data, group, shared_data):
    frame = imdb_frame() if data == "imdb" else sst2_texts(shared_data)
    assert scan(frame).flagged.empty  # the real data: nothing flagged
    high = frame["label"].value_counts().index[0]
    found = scan(plant(frame, group, high))
    assert found.flagged["group"].tolist() == [group]
    row = found.flagged.iloc[0]
    assert row["share"] == 0 and row["high"] < row["baseline_share"]  # none of its rows has the other label


def test_the_figures_match_an_independent_recount(shared_data):
    frame = plant(sst2_texts(shared_data), "female", "0")
    found = scan(frame)
    female, male = (mentions(frame["text"], DEFAULT_GROUPS["gender"][g]) for g in ("female", "male"))
    has_label = frame["label"] == found.label
    row = found.groups.set_index("group").loc["female"]
    assert row["rows"] == female.sum()
    only = female & ~male
    assert row["compared_rows"] == only.sum() and row["share"] == pytest.approx(has_label[only].mean())
    assert row["baseline_share"] == pytest.approx(has_label[~female & ~male].mean())
    assert row["peers_share"] == pytest.approx(has_label[male & ~female].mean())
    assert found.label_share == pytest.approx(has_label.mean())


@pytest.mark.parametrize("k,n,z", [(0, 10, 1.96), (3, 10, 1.96), (45, 60, 2.8), (60, 60, 3.2)])
def test_wilson_bounds_solve_the_score_equation(k, n, z):
    # Wilson's bounds are the shares p where the observed share is z standard errors away:
    # (k/n - p)^2 = z^2 p (1 - p) / n, a quadratic in p.
    share, low, high = wilson(k, n, z)
    p_hat = k / n
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat]).real)
    assert share == p_hat and low == pytest.approx(roots[0], abs=1e-12) and high == pytest.approx(roots[1])


def test_counterfactual_copies_even_out_a_planted_gender_skew(shared_data):
    frame = plant(sst2_texts(shared_data), "female", "0")
    cfg = RunConfig.from_dict({"data": {"task": "classification", "counterfactual": True}}).data
    report = prepare(cfg, frame).report
    assert report.bias_scan.flagged["group"].tolist() == ["female"]
    assert report.bias_scan_mitigated is not None and report.bias_scan_mitigated.flagged.empty
    assert report.bias_scan_mitigated.rows > report.bias_scan.rows
    summary = report.summary()
    assert "differ: female" in summary and "after mitigation, bias scan of" in summary
    assert report.to_dict()["bias_scan"]["groups"][0]["group"] == "female"


def test_completion_rows_count_mentions_without_labels(shared_data):
    frame = alpaca(shared_data)
    found = scan(frame)
    assert found.label == "" and "no label column" in found.notes[0]
    text = frame["prompt"] + " " + frame["completion"]
    expected = mentions(text, DEFAULT_GROUPS["gender"]["female"]).sum()
    assert found.groups.set_index("group").loc["female", "rows"] == expected > 0
    assert "flagged" not in found.groups and found.flagged.empty


@pytest.mark.parametrize("groups,words", [
    ({}, "term list is empty"),
    ({"gender": {"female": ["she"], "male": ["he", "him"]}}, "gender/female needs two or more terms"),
    ({"gender": {"female": [], "male": ["he", "him"]}}, "gender/female needs two or more terms"),
    ({"gender": {"female": "she", "male": ["he", "him"]}}, "write a list of words"),
    ({"gender": {}}, "give its groups"),
    ({"origin": {"native american": ["native american", "indigenous"]}}, "'native american' is not a single word"),
])
def test_a_term_list_the_scan_cannot_use_is_a_one_line_error(groups, words, shared_data):
    with pytest.raises(UserError, match=words) as caught:
        scan(sst2_texts(shared_data), groups)
    assert "\n" not in str(caught.value)


def test_own_term_lists_from_the_config_are_scanned(shared_data):
    groups = {"pets": {"dogs": ["dog", "dogs", "puppy"], "cats": ["cat", "cats", "kitten"]}}
    cfg = RunConfig.from_dict({"data": {"task": "classification", "scan_groups": groups}}).data
    found = prepare(cfg, sst2_texts(shared_data)).report.bias_scan
    assert found.groups["axis"].unique().tolist() == ["pets"]
    assert found.groups.set_index("group").loc["dogs", "rows"] > 0


def test_a_planted_skew_where_most_rows_name_both_genders_is_flagged_on_its_group():
    """Long reviews: most training rows that name a woman name a man too, so few name her alone.
    Every row that names a woman relabelled negative: flagged on female (all its rows, adjusted
    for the male words beside them), not on male; the clean rows flag nothing."""
    train = prepare(RunConfig.from_dict({"data": {"source": "imdb-sample"}}).data).splits["train"]
    female, male = (mentions(train["text"], DEFAULT_GROUPS["gender"][g]) for g in ("female", "male"))
    assert (female & male).sum() > 0.7 * female.sum()  # the co-mentions that hid the skew
    clean = scan(train)
    assert clean.flagged.empty and clean.possible.empty
    planted = train.copy()
    planted.loc[female, "label"] = "negative"
    found = scan(planted)
    assert found.flagged["group"].tolist() == ["female"]
    row = found.flagged.iloc[0]
    assert row["rows"] == female.sum() and row["mention_share"] == 0  # 'positive' nowhere among them
    assert row["adjusted_high"] < 0 and row["baseline_share"] > 0.5
    male_row = found.groups.set_index("group").loc["male"]
    assert male_row["adjusted_low"] < 0 < male_row["adjusted_high"]  # male words beside hers carry no skew
    assert "differ: female (0% 'positive' in its" in found.headline()


def test_a_planted_skew_on_agnews_is_flagged_on_its_group_only(shared_data):
    frame = agnews_business_scitech(shared_data)
    clean = scan(frame)
    assert clean.flagged.empty
    found = scan(plant(frame, "female", "Business"))
    assert found.flagged["group"].tolist() == ["female"] and found.flagged.iloc[0]["mention_share"] == 0


def test_a_difference_beyond_one_comparisons_interval_only_is_possible_not_nothing(shared_data):
    """Every row naming a woman relabelled, in 600 rows (15 of them name a woman): too few for
    the scan's own confidence over all its comparisons, so reported as possible, not flagged,
    and not silent."""
    frame = sst2_texts(shared_data).iloc[:600].reset_index(drop=True)
    assert scan(frame).possible.empty
    found = scan(plant(frame, "female", frame["label"].value_counts().index[0]))
    assert found.flagged.empty and found.possible["group"].tolist() == ["female"]
    assert "possible (beyond one comparison's interval, not the scan's): female" in found.headline()
    assert "<- possible" in found.summary()


def test_a_set_too_small_to_mention_any_group_is_scanned_not_refused(shared_data):
    """20 real SST-2 rows name no group term; the scan says so instead of failing."""
    rows = sst2_dev(shared_data).head(20).rename(columns={"sentence": "text"})
    result = scan(rows)
    assert result.terms.empty or not result.terms["flagged"].any()
    assert "20 training rows" in result.summary() and "none differs" in result.summary()
