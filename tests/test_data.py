import csv
import json
import shutil

import pandas as pd
import pytest

from nb_finetune import UserError
from nb_finetune.config import DataConfig
from nb_finetune.data import normalize, prepare, read_table, split


def _sst2(shared_data, n=300):
    return pd.read_csv(shared_data / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str).head(n)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, shared_data, fmt):
    df = _sst2(shared_data, 120)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar="\\")
        shutil.copy(shared_data / "sst2" / "dev.tsv", path)  # the real GLUE file, bare quotes and all
    elif fmt == "json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict(orient="records")) + "\n")
    else:
        df.to_parquet(path)
    got = read_table(str(path))
    assert list(got.columns) == ["sentence", "label"]
    assert got["sentence"].head(120).tolist() == df["sentence"].tolist()


def test_in_memory_sources(shared_data):
    df = _sst2(shared_data, 50)
    assert read_table(df).equals(df)
    datasets = pytest.importorskip("datasets")
    got = read_table(datasets.Dataset.from_pandas(df))
    assert got["sentence"].tolist() == df["sentence"].tolist()


def test_headerless_file_with_column_names(shared_data):
    cfg = DataConfig(source=str(shared_data / "agnews" / "dev.tsv"), column_names=["text", "label"],
                     max_rows=400, seed=1)
    prep = prepare(cfg)
    assert set(prep.labels) == {"World", "Sports", "Business", "Sci/Tech"}
    assert prep.report.class_balance.sum() == 400


def test_alpaca_maps_to_prompt_and_completion(shared_data):
    raw = read_table(str(shared_data / "alpaca_demo" / "alpaca_en_demo.json"))
    frame = normalize(raw, DataConfig(task="completion"))
    assert list(frame.columns) == ["prompt", "completion"]
    row = raw.iloc[[i for i, x in enumerate(raw["input"]) if x][0]]
    mapped = frame.loc[row.name]
    assert mapped["prompt"] == f"{row['instruction']}\n\n{row['input']}"
    assert mapped["completion"] == row["output"]


def test_chat_messages_column():
    df = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]})
    assert normalize(df, DataConfig(task="completion"))["messages"][0][1]["content"] == "hello"
    bad = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(UserError, match="no assistant turn"):
        normalize(bad, DataConfig(task="completion"))


def test_report_counts_duplicates_conflicts_and_leakage(shared_data):
    df = _sst2(shared_data, 200)
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
    frame = normalize(_sst2(shared_data, 300), DataConfig(text_column="sentence"))
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


def test_label_names_order_and_unknown_label(shared_data):
    df = _sst2(shared_data, 60)
    prep = prepare(DataConfig(text_column="sentence", label_names={"1": "positive", "0": "negative"}), df)
    assert prep.labels == ["positive", "negative"]
    with pytest.raises(UserError, match="no word in data.label_names"):
        prepare(DataConfig(text_column="sentence", label_names={"1": "positive"}), df)


def test_builtin_data_set_resolves_offline():
    prep = prepare(DataConfig(source="imdb-sample"))
    assert prep.labels == ["negative", "positive"]
    assert sum(prep.report.split_sizes.values()) == 200


# -- errors: one line, names the problem and the fix; the file is left as it was --------------

def test_missing_file():
    with pytest.raises(UserError, match="data file not found: .*check the path"):
        read_table("no/such/file.csv")


def test_unknown_column(tmp_path, shared_data):
    path = tmp_path / "d.csv"
    _sst2(shared_data, 20).to_csv(path, index=False)
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        prepare(DataConfig(source=str(path), text_column="review_body"))
    assert "column 'review_body' not found" in str(err.value) and "sentence, label" in str(err.value)
    assert "data.text_column" in str(err.value)
    assert path.read_bytes() == before


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_table(str(empty))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(UserError, match="no data rows"):
        read_table(str(header))


def test_single_class_and_all_empty_text(shared_data):
    df = _sst2(shared_data, 100)
    with pytest.raises(UserError, match="single class"):
        prepare(DataConfig(text_column="sentence"), df[df["label"] == "1"])
    with pytest.raises(UserError, match="text column is empty in every row"):
        prepare(DataConfig(text_column="sentence"), df.assign(sentence=""))


def test_class_too_rare_for_stratified_split(shared_data):
    df = _sst2(shared_data, 100)
    rare = pd.concat([df, pd.DataFrame({"sentence": ["odd one", "odd two"], "label": ["2", "2"]})])
    with pytest.raises(UserError, match="class '2' has only 2 row"):
        prepare(DataConfig(text_column="sentence"), rare)


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n{"text": "c", "label": 0}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_table(str(path))
