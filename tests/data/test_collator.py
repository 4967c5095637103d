"""The collator: padding told apart from EOS by position, dynamic padding to a multiple."""
from nb_finetune.data.collator import CompletionOnlyCollator
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
    assert repr(c) == "CompletionOnlyCollator(pad_token_id=2, pad_to_multiple_of=8, padding_side='right')"
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9)]
    assert c(rows[:1])["input_ids"].shape == (1, 8)
    assert c(rows)["input_ids"].shape == (2, 16)
    assert CompletionOnlyCollator(2, None)(rows)["input_ids"].shape == (2, 9)
