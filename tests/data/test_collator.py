"""The collator: padding told apart from EOS by position, dynamic padding to a multiple."""
from nb_finetune.data.collator import CompletionOnlyCollator, PaddingTally
from nb_finetune.data.formatter import IGNORE, Formatter


def test_eos_trained_even_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: both <|im_end|>
    fmt = Formatter.build(tokenizer, "completion", [], max_length=64, chat_template="no")
    f = fmt.encode({"prompt": "Translate 'chat' to English:", "completion": "cat"})
    assert f["input_ids"][-1] == tokenizer.eos_token_id and f["labels"][-1] == tokenizer.eos_token_id
    batch = CompletionOnlyCollator(tokenizer.pad_token_id)([f, fmt.encode({"prompt": "x" * 80, "completion": "y"})])
    n = len(f["input_ids"])
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id  # kept, though it equals the pad id
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["input_ids"].shape[1] % 8 == 0


def test_collator_repr_and_dynamic_padding(tokenizer):
    c = CompletionOnlyCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert repr(c) == ("CompletionOnlyCollator(pad_token_id=2, pad_to_multiple_of=8, padding_side='right', "
                       "flatten=False)")
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9)]
    assert c(rows[:1])["input_ids"].shape == (1, 8)
    assert c(rows)["input_ids"].shape == (2, 16)
    assert CompletionOnlyCollator(2, None)(rows)["input_ids"].shape == (2, 9)


def test_padding_free_batch_is_one_row_with_positions_restarting_and_counted():
    tally = PaddingTally()
    c = CompletionOnlyCollator(2, pad_to_multiple_of=8, flatten=True, tally=tally)
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, 10, 11, 12]}]
    batch = c(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    # each row's first label is never predicted from its own tokens: not trained, padded or flat
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1] * 8]
    assert (tally.tokens, tally.padded, tally.built) == (8, 16, 8)
    assert tally.shares() == {"batches_padded": 0.5, "as_built": 0.0}
    assert tally.summary().startswith("padding share of the training batches: 50.0% padded to each batch's "
                                      "longest row, 0.0% as trained")


def test_padding_free_keeps_packed_positions_and_leaves_unpadded_batches_and_heads_alone():
    c = CompletionOnlyCollator(2, pad_to_multiple_of=None, flatten=True)
    packed = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, 6, IGNORE, 8], "position_ids": [0, 1, 0, 1]},
              {"input_ids": [9, 10], "labels": [IGNORE, 10], "position_ids": [0, 1]}]
    assert c(packed)["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]
    same = [{"input_ids": [5, 6], "labels": [5, 6]}] * 2
    assert c(same)["input_ids"].shape == (2, 2)  # nothing padded, nothing to save
    heads = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [5], "labels": 0}]
    assert c(heads)["input_ids"].shape == (2, 3) and c(heads)["labels"].tolist() == [1, 0]
