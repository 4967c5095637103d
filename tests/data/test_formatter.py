"""Completion-only formatting rules: which tokens are trained, how long rows are cut, and
that generation starts from the tokens training saw (the TRL comparison lives in
test_collator_vs_trl.py)."""
import pytest

from nb_finetune import UserError
from nb_finetune.data.formatter import IGNORE, Formatter


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


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    f = Formatter.build(tokenizer, "completion", [], max_length=256).encode({"messages": msgs})
    assert _trained(tokenizer, f) == "Blue.<|im_end|>Green.<|im_end|>"


def test_a_short_response_is_found_in_the_assistant_turn_not_in_the_template_text(tokenizer):
    """SmolLM2's template adds a system prompt ("...a helpful AI..."); a one-letter response "l"
    and a prompt "<" (also in "<|im_start|>") must train the assistant's "l" and its end token
    only (found by hypothesis in tests/data/test_properties.py)."""
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
    by hypothesis in tests/data/test_properties.py)."""
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
