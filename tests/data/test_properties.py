"""Property-based tests (hypothesis) of the data loader and the completion-only collator."""
import json

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nb_finetune.config import DataConfig
from nb_finetune.data import read_table
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import IGNORE, Formatter

# Printable text with the characters that break naive loaders: quotes, delimiters, newlines.
text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters='\n\t";,|\''),
               min_size=1, max_size=80).filter(lambda s: s.strip())
label = st.sampled_from(["pos", "neg", "neutral", "1", "0"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, label), min_size=2, max_size=12), fmt=st.sampled_from(["csv", "jsonl"]))
def test_loader_round_trips_any_text(tmp_path_factory, rows, fmt):
    df = pd.DataFrame(rows, columns=["text", "label"])
    path = tmp_path_factory.mktemp("p") / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict(orient="records")))
    got = read_table(str(path), DataConfig())
    assert got["text"].tolist() == df["text"].tolist()
    assert got["label"].astype(str).tolist() == df["label"].tolist()


words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60).filter(
    lambda s: s.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=words, response=words, chat=st.booleans(), max_length=st.integers(8, 96),
       others=st.lists(st.integers(1, 120), max_size=3), multiple=st.sampled_from([None, 1, 8, 64]))
def test_collator_trains_only_the_response(tokenizer, prompt, response, chat, max_length, others, multiple):
    fmt = Formatter.build(tokenizer, "completion", [], max_length, "auto" if chat else "no")
    row = {"prompt": prompt, "completion": response}
    f = fmt.encode(row)
    ids, labels = f["input_ids"], f["labels"]
    assert len(ids) == len(labels) <= max_length
    # labels are the token ids themselves wherever they are trained
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    if trained and not f["response_truncated"]:
        # the trained tokens spell the response (with at most a separating space) and its end token
        spelled = tokenizer.decode(trained)
        end = tokenizer.eos_token
        assert spelled.endswith(end)
        body = spelled[: -len(end)]
        # compare through the tokenizer: some characters have no token and decode as U+FFFD
        want = tokenizer.decode(tokenizer(response, add_special_tokens=False)["input_ids"]).strip()
        assert body.strip() == want
        # generation starts where training starts
        if not f["prompt_truncated"]:
            p = fmt.prompt_ids(row)
            assert ids[: len(p)] == p and labels[len(p)] != IGNORE and all(x == IGNORE for x in labels[: len(p)])
    # however the batch is padded, this row keeps exactly its labels, and padding is never trained
    filler = [{"input_ids": [5] * n, "labels": [5] * n} for n in others]
    batch = CompletionOnlyCollator(tokenizer.pad_token_id, multiple)([f] + filler)
    n = len(ids)
    assert batch["labels"][0, :n].tolist() == labels
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    if multiple:
        assert batch["input_ids"].shape[1] % multiple == 0
