"""Messy files: each is read right or refused with one line naming the problem and the fix;
the file itself is never modified."""
from collections import namedtuple

import pytest
from conftest import sst2_dev

from nb_finetune import UserError
from nb_finetune.config import DataConfig
from nb_finetune.data import prepare, read_table


@pytest.fixture
def sst2_rows(shared_data):
    return sst2_dev(shared_data).head(40)


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path, path.read_bytes()


def _lines(df, sep):
    return "text" + sep + "label\n" + "".join(f'"{t}"{sep}{lab}\n' for t, lab in zip(df["sentence"].str.replace('"', "'"),
                                                                                    df["label"]))


def test_byte_order_mark(tmp_path, sst2_rows):
    path, before = _write(tmp_path / "bom.csv", "\ufeff" + _lines(sst2_rows, ","))
    df = read_table(str(path))
    assert list(df.columns) == ["text", "label"] and len(df) == 40
    assert path.read_bytes() == before


def test_semicolon_delimiter(tmp_path, sst2_rows):
    path, before = _write(tmp_path / "semi.csv", _lines(sst2_rows, ";"))
    df = read_table(str(path))
    assert list(df.columns) == ["text", "label"] and df["label"].isin(["0", "1"]).all()
    assert path.read_bytes() == before


def test_quoted_newlines(tmp_path, sst2_rows):
    rows = sst2_rows.assign(sentence=sst2_rows["sentence"] + "\nsecond line, with a comma")
    path = tmp_path / "nl.csv"
    rows.to_csv(path, index=False)
    df = read_table(str(path))
    assert len(df) == 40 and df["sentence"].str.contains("\nsecond line, with a comma").all()


def test_ragged_rows_refused_then_skipped_with_a_count(tmp_path, sst2_rows):
    text = _lines(sst2_rows, ",").splitlines()
    text[5] += ",extra,fields"
    text[9] += ",extra"
    path, before = _write(tmp_path / "ragged.csv", "\n".join(text) + "\n")
    with pytest.raises(UserError, match="a row has 4 fields .*skip_bad_lines"):
        read_table(str(path))
    prep = prepare(DataConfig(source=str(path), skip_bad_lines=True, val_fraction=0.1, test_fraction=0.1))
    checks = prep.report.checks.set_index("check")["count"]
    assert checks["unreadable lines skipped"] == 2 and checks["rows"] == 38
    assert path.read_bytes() == before


def test_non_utf8(tmp_path, sst2_rows):
    path, before = _write(tmp_path / "latin1.csv", _lines(sst2_rows, ",") + '"caf\xe9 au lait",1\n', "latin-1")
    with pytest.raises(UserError, match="not UTF-8 text .*re-save it as UTF-8"):
        read_table(str(path))
    assert path.read_bytes() == before


def test_jsonl_broken_line_named_then_skipped(tmp_path, sst2_rows):
    import json
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in zip(sst2_rows["sentence"], sst2_rows["label"])]
    lines[6] = lines[6][:-5]
    path, before = _write(tmp_path / "broken.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 7 is not valid JSON.*skip_bad_lines"):
        read_table(str(path))
    prep = prepare(DataConfig(source=str(path), skip_bad_lines=True, val_fraction=0.1, test_fraction=0.1))
    assert prep.report.checks.set_index("check")["count"]["unreadable lines skipped"] == 1
    assert path.read_bytes() == before


def test_file_too_large_for_memory_is_refused_before_loading(tmp_path, sst2_rows, monkeypatch):
    import psutil
    path = tmp_path / "big.csv"
    sst2_rows.to_csv(path, index=False)
    free = namedtuple("vm", "available")(path.stat().st_size * 2)  # less than 6x the file
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with pytest.raises(UserError, match="loading it would take about .* of memory"):
        read_table(str(path))
