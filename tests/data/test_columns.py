"""Column mapping: the user's columns to each task's standard ones, and the errors a wrong
column name gets."""

import pandas as pd
import pytest
from conftest import sst2_dev

from nb_finetune import UserError
from nb_finetune.config import DataConfig
from nb_finetune.data import normalize, prepare, read_table


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


def test_label_names_order_and_unknown_label(shared_data):
    df = sst2_dev(shared_data).head(60)
    prep = prepare(DataConfig(text_column="sentence", label_names={"1": "positive", "0": "negative"}), df)
    assert prep.labels == ["positive", "negative"]
    with pytest.raises(UserError, match="no word in data.label_names"):
        prepare(DataConfig(text_column="sentence", label_names={"1": "positive"}), df)


def test_unknown_column(tmp_path, shared_data):
    path = tmp_path / "d.csv"
    sst2_dev(shared_data).head(20).to_csv(path, index=False)
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        prepare(DataConfig(source=str(path), text_column="review_body"))
    assert "column 'review_body' not found" in str(err.value) and "sentence, label" in str(err.value)
    assert "data.text_column" in str(err.value)
    assert path.read_bytes() == before
