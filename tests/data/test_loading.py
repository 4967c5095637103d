"""Loading a table: every file format, in-memory sources, built-in names, and the errors a
bad file gets (one line that names the problem and the fix)."""
import csv
import json
import shutil

import pytest
from conftest import sst2_dev

from nb_finetune import UserError
from nb_finetune.config import DataConfig
from nb_finetune.data import prepare, read_table


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, shared_data, fmt):
    df = sst2_dev(shared_data).head(120)
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
    df = sst2_dev(shared_data).head(50)
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


def test_builtin_data_set_resolves_offline():
    prep = prepare(DataConfig(source="imdb-sample"))
    assert prep.labels == ["negative", "positive"]
    assert sum(prep.report.split_sizes.values()) == 200


def test_missing_file():
    with pytest.raises(UserError, match="data file not found: .*check the path"):
        read_table("no/such/file.csv")


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_table(str(empty))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(UserError, match="no data rows"):
        read_table(str(header))


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n{"text": "c", "label": 0}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_table(str(path))
