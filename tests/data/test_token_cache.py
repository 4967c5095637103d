"""The token cache: the same rows and stats read back without tokenizing, a miss whenever
anything the tokens depend on changes, damage and read-only folders tolerated, and eviction
of the least recently used entries."""
import pytest
from conftest import alpaca

from nb_finetune.data import token_cache
from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import tokenize_frame


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
        frame = alpaca(shared_data, slice(0, 300))
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
    frame = alpaca(shared_data, slice(0, 120))
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
    frame = alpaca(shared_data, slice(0, 60))
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
    monkeypatch.setattr(token_cache.os, "utime", read_only)  # a cache another user filled: still read
    said.clear()
    assert tokenize_frame(frame, fmt, cache=tmp_path, progress=said.append)[0].features == fresh
    assert len(said) == 1 and "read from the cache" in said[0]


def test_token_cache_keeps_the_most_recently_used_entries_within_its_size(tokenizer, shared_data, tmp_path,
                                                                         monkeypatch):
    import time
    frame = alpaca(shared_data, slice(0, 100))
    fmts = [Formatter.build(tokenizer, "completion", [], n) for n in (100, 110, 120)]
    tokenize_frame(frame, fmts[0], cache=tmp_path)
    size = next(tmp_path.glob("*.npz")).stat().st_size
    monkeypatch.setattr(token_cache, "TOKEN_CACHE_BYTES", int(2.5 * size))  # room for two entries
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
