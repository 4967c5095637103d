"""Tokenized splits: rows with no trained token counted and dropped, and packing."""
import pandas as pd
import pytest
from conftest import alpaca

from nb_finetune import UserError
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import IGNORE, Formatter
from nb_finetune.data.tokens import tokenize_frame


def test_rows_with_no_trained_token_are_counted_and_dropped(tokenizer):
    frame = pd.DataFrame({"prompt": ["Write a long poem."] * 2, "completion": ["word " * 200, "short"]})
    fmt = Formatter.build(tokenizer, "completion", [], max_length=8)
    ds, stats = tokenize_frame(frame, fmt)
    # a cut prompt keeps 8 tokens of its head and tail, so at max_length 8 no response token survives
    assert stats.dropped_no_trained == 2 and len(ds) == 0
    fmt = Formatter.build(tokenizer, "completion", [], max_length=48)
    ds, stats = tokenize_frame(frame, fmt)
    assert stats.response_truncated == 1 and stats.dropped_no_trained == 0 and len(ds) == 2
    assert "1 responses cut" in stats.summary(48)


def test_packing_puts_every_row_once_into_rows_that_fit(tokenizer, shared_data):
    from nb_finetune.data.tokens import pack, pack_rows
    frame = alpaca(shared_data, slice(0, 200))
    fmt = Formatter.build(tokenizer, "completion", [], max_length=256)
    ds, _ = tokenize_frame(frame, fmt)
    lengths = [len(f["input_ids"]) for f in ds.features]
    groups = pack_rows(lengths, 256)
    assert sorted(i for g in groups for i in g) == list(range(len(ds)))
    assert all(sum(lengths[i] for i in g) <= 256 for g in groups)
    assert len(groups) < len(ds) * 0.75  # Alpaca rows are short: several fit in one
    assert len(groups) <= -(-sum(lengths) // 256) * 1.15  # close to the fewest rows possible

    packed = pack(ds, 256)
    assert len(packed) == len(groups)
    row, group = packed.features[0], groups[0]
    assert row["input_ids"] == [t for i in group for t in ds.features[i]["input_ids"]]
    starts = [j for j, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == len(group)
    for j, i in zip(starts, group):  # each row's first label is not trained, the rest are kept
        original = ds.features[i]["labels"]
        assert row["labels"][j] == IGNORE and row["labels"][j + 1:j + len(original)] == original[1:]

    batch = CompletionOnlyCollator(tokenizer.pad_token_id)([packed[i] for i in range(3)])
    n = len(packed[2]["input_ids"])
    assert batch["position_ids"][2, :n].tolist() == packed[2]["position_ids"]
    assert batch["position_ids"][2, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
    assert int(batch["attention_mask"].sum()) == sum(len(packed[i]["input_ids"]) for i in range(3))


def test_packing_refuses_a_classification_head(tokenizer, sst2_frame):
    from nb_finetune.data.tokens import pack
    fmt = Formatter.build(tokenizer, "classification", ["0", "1"], max_length=64)
    ds, _ = tokenize_frame(sst2_frame.rename(columns={"sentence": "text"}), fmt, {"0": 0, "1": 1})
    with pytest.raises(UserError, match="train.packing needs a causal-LM objective"):
        pack(ds, 64)
