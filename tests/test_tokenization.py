"""Completion-only tokenization rules (the TRL comparison lives in test_collator_vs_trl.py)."""
import pandas as pd
import pytest

from nb_finetune import UserError
from nb_finetune.tokenization import IGNORE, CompletionOnlyCollator, Formatter, tokenize_frame


def _trained(tok, f):
    return tok.decode([i for i, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE])


def test_long_prompt_is_cut_in_the_middle_and_response_kept(tokenizer, shared_data):
    review = (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:40]
    row = {"text": " ".join(review), "label": "positive"}
    fmt = Formatter.build(tokenizer, "classification", ["negative", "positive"], max_length=64)
    f = fmt.encode(row)
    assert len(f["input_ids"]) == 64 and f["prompt_truncated"] and not f["response_truncated"]
    assert _trained(tokenizer, f) == "positive<|im_end|>"
    text = tokenizer.decode(f["input_ids"])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\npositive<|im_end|>\n")


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


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    f = Formatter.build(tokenizer, "completion", [], max_length=256).encode({"messages": msgs})
    assert _trained(tokenizer, f) == "Blue.<|im_end|>Green.<|im_end|>"


def test_a_short_response_is_found_in_the_assistant_turn_not_in_the_template_text(tokenizer):
    """SmolLM2's template adds a system prompt ("...a helpful AI..."); a one-letter response "l"
    and a prompt "<" (also in "<|im_start|>") must train the assistant's "l" and its end token
    only (found by hypothesis in tests/test_properties.py)."""
    fmt = Formatter.build(tokenizer, "completion", [], 256)
    f = fmt.encode({"prompt": "<", "completion": "l"})
    trained = [i for i, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE]
    assert tokenizer.decode(trained) == "l<|im_end|>"
    assert f["labels"][len(fmt.prompt_ids({"prompt": "<", "completion": "l"}))] != IGNORE


@pytest.mark.parametrize("prompt, response", [("0 ", ":"), ("Question: 2+2?\nAnswer: ", "4"), ("a\n\n", "b")])
def test_plain_text_generation_starts_from_the_tokens_training_saw(tokenizer, prompt, response):
    """A plain-text prompt ending in whitespace: alone "0 " tokenizes as "0", " " but in the
    training row " :" is one token. The prompt's whitespace goes with the response, so the
    prompt's ids are a prefix of the row's and the first token after them is trained (found
    by hypothesis in tests/test_properties.py)."""
    fmt = Formatter.build(tokenizer, "completion", [], 256, chat_template="no")
    row = {"prompt": prompt, "completion": response}
    f, p = fmt.encode(row), fmt.prompt_ids(row)
    assert f["input_ids"][: len(p)] == p
    assert all(x == IGNORE for x in f["labels"][: len(p)]) and f["labels"][len(p)] != IGNORE
    assert tokenizer.decode(f["input_ids"]).startswith(prompt + response)  # the text is unchanged


def test_a_chat_answer_starting_with_spaces_is_trained_from_where_generation_starts(tokenizer):
    """"assistant\n" + "  0" puts "\n " in one token; the answer's leading spaces are dropped
    so the row holds the generation prompt's tokens (found by hypothesis)."""
    fmt = Formatter.build(tokenizer, "completion", [], 256)
    row = {"prompt": "0", "completion": "  0"}
    f, p = fmt.encode(row), fmt.prompt_ids(row)
    assert f["input_ids"][: len(p)] == p and f["labels"][len(p)] != IGNORE
    assert _trained(tokenizer, f) == "0<|im_end|>"


def test_template_that_changes_the_response_is_reported(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    fmt = Formatter.build(tok, "completion", [], max_length=64)
    with pytest.raises(UserError, match="chat template changed"):
        fmt.encode({"prompt": "hello", "completion": "world"})


def test_collator_repr_and_dynamic_padding(tokenizer):
    c = CompletionOnlyCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert repr(c) == ("CompletionOnlyCollator(pad_token_id=2, pad_to_multiple_of=8, label_pad_token_id=-100, "
                       "return_tensors='pt', mlm=False, padding_side='right')")
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9)]
    assert c(rows[:1])["input_ids"].shape == (1, 8)
    assert c(rows)["input_ids"].shape == (2, 16)
    assert CompletionOnlyCollator(2, None)(rows)["input_ids"].shape == (2, 9)


def test_packing_puts_every_row_once_into_rows_that_fit(tokenizer, shared_data):
    import json
    from nb_finetune import config, data
    from nb_finetune.tokenization import pack, pack_rows
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[:200], config.DataConfig(task="completion"))
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
    from nb_finetune.tokenization import pack
    fmt = Formatter.build(tokenizer, "classification", ["0", "1"], max_length=64)
    ds, _ = tokenize_frame(sst2_frame.rename(columns={"sentence": "text"}), fmt, {"0": 0, "1": 1})
    with pytest.raises(UserError, match="train.packing needs a causal-LM objective"):
        pack(ds, 64)


# -- the token cache -----------------------------------------------------------------------

def _alpaca(shared_data, n=300):
    import json
    from nb_finetune import config, data
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text()))
    return data.normalize(raw.iloc[:n], config.DataConfig(task="completion"))


def _no_tokenizing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(Formatter, "encode_many", refuse)
    monkeypatch.setattr(Formatter, "encode_classification_many", refuse)


@pytest.mark.parametrize("kind", ["chat", "plain", "head"])
def test_token_cache_gives_the_same_rows_and_stats_without_tokenizing_again(kind, tokenizer, shared_data,
                                                                            sst2_frame, tmp_path, monkeypatch):
    if kind == "head":
        frame = sst2_frame.rename(columns={"sentence": "text"}).assign(label=lambda f: f["label"].map(
            {"0": "negative", "1": "positive"}))
        fmt, heads = Formatter.build(tokenizer, "classification", ["negative", "positive"], 24), {"negative": 0,
                                                                                                 "positive": 1}
    else:
        frame = _alpaca(shared_data)
        fmt, heads = Formatter.build(tokenizer, "completion", [], 96, "yes" if kind == "chat" else "no"), None
    fresh, fresh_stats = tokenize_frame(frame, fmt, heads)
    said = []
    first, first_stats = tokenize_frame(frame, fmt, heads, cache=tmp_path, progress=said.append)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not said
    _no_tokenizing(monkeypatch)
    again, again_stats = tokenize_frame(frame, fmt, heads, cache=tmp_path, progress=said.append)
    assert said == [f"tokens of {len(frame)} rows read from the cache ({tmp_path})"]
    assert first.features == again.features == fresh.features and first_stats == again_stats == fresh_stats
    assert fresh_stats.prompt_truncated > 0  # truncation flags come back too
    assert type(again.features[0]["input_ids"][0]) is int and type(again.features[0]["prompt_truncated"]) is bool


def test_token_cache_misses_when_anything_the_tokens_depend_on_changes(tokenizer, shared_data, tmp_path):
    frame = _alpaca(shared_data, 120)
    fmt = Formatter.build(tokenizer, "completion", [], 128)
    changed_text = frame.copy()
    changed_text.loc[5, "completion"] += " Also this."
    variants = [(frame, fmt), (frame, Formatter.build(tokenizer, "completion", [], 127)),
                (frame, Formatter.build(tokenizer, "completion", [], 128, "no")), (changed_text, fmt),
                (frame.iloc[:119], fmt)]
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = tokenizer.chat_template.replace("system", "System")
    variants.append((frame, Formatter.build(other, "completion", [], 128)))
    for i, (rows, f) in enumerate(variants, 1):
        got, _ = tokenize_frame(rows, f, cache=tmp_path)
        assert len(list(tmp_path.glob("*.npz"))) == i  # a new entry, not an old one read back
        assert got.features == tokenize_frame(rows, f)[0].features


def test_a_damaged_or_unwritable_token_cache_costs_only_the_tokenizing(tokenizer, shared_data, tmp_path,
                                                                       monkeypatch):
    frame = _alpaca(shared_data, 60)
    fmt = Formatter.build(tokenizer, "completion", [], 128)
    fresh = tokenize_frame(frame, fmt)[0].features
    tokenize_frame(frame, fmt, cache=tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])  # a write cut short
    said = []
    assert tokenize_frame(frame, fmt, cache=tmp_path, progress=said.append)[0].features == fresh
    assert tokenize_frame(frame, fmt, cache=tmp_path, progress=said.append)[0].features == fresh
    assert len(said) == 1 and "read from the cache" in said[0]  # tokenized and replaced, then read
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert tokenize_frame(frame, fmt, cache=blocked)[0].features == fresh
    def read_only(*args):
        raise PermissionError("read-only file system")
    from nb_finetune import tokenization
    monkeypatch.setattr(tokenization.os, "utime", read_only)  # a cache another user filled: still read
    said.clear()
    assert tokenize_frame(frame, fmt, cache=tmp_path, progress=said.append)[0].features == fresh
    assert len(said) == 1 and "read from the cache" in said[0]


def test_token_cache_keeps_the_most_recently_used_entries_within_its_size(tokenizer, shared_data, tmp_path,
                                                                         monkeypatch):
    import time

    from nb_finetune import tokenization
    frame = _alpaca(shared_data, 100)
    fmts = [Formatter.build(tokenizer, "completion", [], n) for n in (100, 110, 120)]
    tokenize_frame(frame, fmts[0], cache=tmp_path)
    size = next(tmp_path.glob("*.npz")).stat().st_size
    monkeypatch.setattr(tokenization, "TOKEN_CACHE_BYTES", int(2.5 * size))  # room for two entries
    time.sleep(0.01)
    tokenize_frame(frame, fmts[1], cache=tmp_path)
    time.sleep(0.01)
    tokenize_frame(frame, fmts[0], cache=tmp_path)  # read: now the most recently used
    time.sleep(0.01)
    tokenize_frame(frame, fmts[2], cache=tmp_path)  # the entry of fmts[1] goes
    assert len(list(tmp_path.glob("*.npz"))) == 2
    _no_tokenizing(monkeypatch)
    for f in (fmts[0], fmts[2]):
        tokenize_frame(frame, f, cache=tmp_path)
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_frame(frame, fmts[1], cache=tmp_path)
