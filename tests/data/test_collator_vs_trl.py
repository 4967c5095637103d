"""Our completion-only masks (`Formatter.encode` + `CompletionOnlyCollator`) against TRL 1.x's,
token by token, with the real SmolLM2-135M-Instruct tokenizer.

The reference is TRL's own: an `SFTTrainer` (on a tiny random llama; no step is run) is given
prompt-completion rows and prepares them as it trains them: its tokenization (the prompt alone
and prompt + completion, the completion starting where the two diverge; plain text gets the EOS
appended to the completion), `completion_only_loss` (on by default for prompt-completion rows)
turning its `completion_mask` into labels, truncation to `max_length`; then its collator,
`trl.trainer.sft_trainer.DataCollatorForLanguageModeling`. Nothing of TRL's is re-implemented here.
Plain rows reach TRL with our separator at the head of the completion (TRL concatenates prompt
and completion as they are); chat rows as TRL's conversational prompt-completion layout.

Where they agree, on the first 100 Alpaca demo rows: every response token and the token that
closes it (plain text: the EOS; chat: the template's <|im_end|>), on the same token sequence;
plain text entirely, including a lone " " separator before a digit; and padding (right, -100).

Where they are EXPECTED to differ (each asserted explicitly below, by position and in total):
 (a) chat: TRL's completion is everything after the prompt's generation prompt, so it also
     trains the "\\n" (id 198) the template puts after the final <|im_end|>. Ours does not.
 (b) rows longer than max_length: TRL keeps their start (`truncation_mode="keep_start"`), so it
     cuts the response; ours cuts the middle of the prompt first and keeps the response.
 (c) a prompt that ends in whitespace, before a digit: TRL leaves the lone " " in the prompt
     (the prompt's own tokens are a prefix of the whole); ours trains it, as generation, which
     starts from the prompt without its trailing whitespace, has to produce it.
 (d) multi-turn chats: as prompt-completion TRL trains the last assistant turn only; as
     `messages`, every token, unless `assistant_only_loss`, which needs `{% generation %}`
     markers SmolLM2's template lacks (a ValueError). Ours trains every assistant turn.
 (e) padding: TRL pads on the right only; ours on either side, told apart by position.

What changed from trl 0.19.1 (`DataCollatorForCompletionOnlyLM`, removed in 0.20): labels no
longer come from matching a response template in the ids, so a template tokenized differently
in context no longer drops the row, and they are no longer masked where the token equals the
pad id, so the EOS / <|im_end|> (SmolLM2's pad id) is trained now, as ours always did.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA, alpaca

from nb_finetune import config, modeling
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import IGNORE, Formatter

ALPACA = SHARED_DATA / "alpaca_demo" / "alpaca_en_demo.json"
N_ROWS = 100
MAX_LENGTH = 512

# SmolLM2-135M-Instruct token ids this file relies on (checked in test_tokenizer_facts).
EOS = 2                                   # <|im_end|>: eos_token_id == pad_token_id
NL = 198                                  # "\n"
SPACE = 216                               # " " on its own
CHAT_HEADER = [1, 520, 9531, 198]         # "<|im_start|>assistant\n"
USER_HEADER = [1, 4093, 198]              # "<|im_start|>user\n"


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def trl_prepare(tiny_model, tok, tmp_path_factory):
    """rows -> (TRL's prepared rows: input_ids and labels, in order; its collator). TRL is imported
    here, not at collection, where it would cost every test process seconds."""
    pytest.importorskip("trl", minversion="1.16")  # the test extra pins trl>=1.16 (Python >= 3.11)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def prepare(rows: list[dict], max_length: int | None = MAX_LENGTH, **options):
        args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("trl")), max_length=max_length, report_to="none",
                         use_cpu=True, bf16=False, **options)
        trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset], \
            trainer.data_collator
    return prepare


@pytest.fixture(scope="module")
def alpaca_rows() -> list[dict]:
    """The first 100 Alpaca demo rows, normalised to {prompt, completion}."""
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} is not here")
    frame = alpaca(SHARED_DATA, slice(0, N_ROWS))
    assert list(frame.columns) == ["prompt", "completion"] and len(frame) == N_ROWS
    return frame.to_dict(orient="records")


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def trained(labels) -> np.ndarray:
    return np.flatnonzero(np.asarray(labels) != IGNORE)


def find_all(ids: list[int], sub: list[int]) -> list[int]:
    """Start positions of `sub` in `ids`."""
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


def both_layouts(mode: str, row: dict) -> tuple[dict, dict]:
    """The row as ours takes it and as TRL takes it (plain: with our separator on the completion)."""
    if mode == "chat":
        return row, {"prompt": [{"role": "user", "content": row["prompt"]}],
                     "completion": [{"role": "assistant", "content": row["completion"]}]}
    prompt = f"### Instruction:\n{row['prompt']}\n\n### Response:"
    return {"prompt": prompt, "completion": row["completion"]}, {"prompt": prompt, "completion": " " + row["completion"]}


def test_tokenizer_facts(tok):
    """The ids hard-coded above, and the pad == eos setup that 0.19.1's collator tripped on."""
    assert tok.is_fast
    assert tok.eos_token_id == tok.pad_token_id == EOS
    assert tok.convert_ids_to_tokens(EOS) == "<|im_end|>"
    assert enc(tok, "<|im_start|>assistant\n") == CHAT_HEADER
    assert enc(tok, "<|im_start|>user\n") == USER_HEADER
    assert enc(tok, ": 3") == [42, SPACE, 35]           # a digit does not absorb the space before it
    assert enc(tok, ": Hi") == [42, 21041]              # a word does (" Hi")
    assert tok.decode([21041]) == " Hi"


# -- 1. real data: labels compared position by position ---------------------------------------

# Exact tallies on the first 100 Alpaca demo rows (fixed data, fixed tokenizer): rows with
# difference (a), rows over MAX_LENGTH (difference (b)), of those the ones whose prompt ours cut,
# rows whose first trained token is a lone " " separator (plain: trained by both).
EXPECTED = {"plain": (0, 1, 1, 16), "chat": (97, 3, 3, 0)}


def check_cut_row(f: dict, cut: dict, whole: dict) -> bool:
    """(b) on one over-long row; whether ours cut its prompt."""
    assert cut["input_ids"] == whole["input_ids"][:MAX_LENGTH] and cut["labels"] == whole["labels"][:MAX_LENGTH]
    assert len(f["input_ids"]) == MAX_LENGTH and (f["prompt_truncated"] or f["response_truncated"])
    ours, full = np.asarray(f["labels"]), np.asarray(whole["labels"])
    ours, full = ours[trained(ours)].tolist(), full[trained(full)].tolist()
    # Ours keeps at least as much of the response as TRL, and what it keeps is the response's start.
    assert ours == full[:len(ours)] and len(ours) >= trained(cut["labels"]).size
    if f["prompt_truncated"]:
        assert len(ours) > trained(cut["labels"]).size
    return f["prompt_truncated"]


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_masks_match_trl_except_documented_differences(tok, alpaca_rows, trl_prepare, mode):
    assert not any(r["completion"][:1].isspace() for r in alpaca_rows)  # so " " is our separator
    fmt = Formatter.build(tok, "completion", [], max_length=MAX_LENGTH, chat_template="no" if mode == "plain" else "auto")
    assert fmt.use_chat == (mode == "chat")
    ours_rows, trl_rows = zip(*(both_layouts(mode, r) for r in alpaca_rows))
    feats = fmt.encode_many(list(ours_rows))
    theirs, _ = trl_prepare(list(trl_rows))
    whole, _ = trl_prepare(list(trl_rows), max_length=None)
    assert len(theirs) == len(whole) == N_ROWS  # TRL dropped no row

    n_a = n_over = n_prompt_cut = n_sep = agreed = 0
    for row, f, t, w in zip(ours_rows, feats, theirs, whole):
        if len(w["input_ids"]) > MAX_LENGTH:  # (b)
            n_over += 1
            n_prompt_cut += check_cut_row(f, t, w)
            continue
        assert t == w and not f["prompt_truncated"] and not f["response_truncated"]
        ids = f["input_ids"]
        assert ids == t["input_ids"]  # identical token sequences
        ours, th, n = np.asarray(f["labels"]), np.asarray(t["labels"]), len(ids)
        diff = np.flatnonzero(ours != th).tolist()
        end = n - 2 if mode == "chat" else n - 1  # the token that closes the response
        assert ids[end] == EOS and ours[end] == th[end] == EOS  # both train it
        if mode == "chat":  # (a) the "\n" after the final <|im_end|>: TRL trains it, ours not
            assert diff == [n - 1] and ids[n - 1] == NL and th[n - 1] == NL and ours[n - 1] == IGNORE
        else:
            assert diff == []
        n_a += bool(diff)
        # Everything else agrees token by token: same trained positions, same label ids.
        content = trained(ours)
        assert (th[content] == np.asarray(ids)[content]).all() and (ours[content] == th[content]).all()
        agreed += content.size
        first = int(content[0])
        n_sep += ids[first] == SPACE
        # Generation starts from prompt_ids: the trained tokens follow it directly, on both sides.
        p_ids = fmt.prompt_ids(row)
        assert ids[:len(p_ids)] == p_ids and first == len(p_ids) == int(trained(th)[0])
    assert (n_a, n_over, n_prompt_cut, n_sep) == EXPECTED[mode]
    assert agreed > 10_000  # the agreement covers real responses, not a handful of tokens


def test_plain_separator_rows_are_digit_first(tok, alpaca_rows):
    """A lone " " separator appears exactly on the rows whose response starts with a digit, and
    ours trains it there (it is the first trained token); TRL, given it on the completion, too
    (the 16 of EXPECTED["plain"])."""
    fmt = Formatter.build(tok, "completion", [], max_length=MAX_LENGTH, chat_template="no")
    rows = [both_layouts("plain", r)[0] for r in alpaca_rows]
    lone_space = []
    for r in rows:
        f = fmt.encode(r)
        k = int(trained(f["labels"])[0])
        lone_space.append(f["input_ids"][k] == SPACE)
    digit_first = [r["completion"][:1].isdigit() for r in rows]
    assert lone_space == digit_first and sum(lone_space) == EXPECTED["plain"][3]


# -- 2. where the prompt ends: whitespace, and text that merges across the boundary ------------

def plain_pair(tok, trl_prepare, prompt: str, completion: str):
    """(ours, TRL's) prepared row; TRL gets the completion as ours renders it after the prompt."""
    fmt = Formatter.build(tok, "completion", [], max_length=MAX_LENGTH, chat_template="no")
    row = {"prompt": prompt, "completion": completion}
    text, [(start, _)] = fmt.render(row)
    assert text.startswith(prompt.rstrip())
    (theirs,), _ = trl_prepare([{"prompt": prompt, "completion": text[len(prompt):]}])
    return fmt.encode(row), theirs, fmt.prompt_ids(row)


def test_prompt_ending_in_whitespace_before_a_digit(tok, trl_prepare):
    """(c): the same ids; TRL leaves the lone " " untrained, ours trains it (generation starts
    from the prompt without its trailing space, so the model has to produce it)."""
    ours, theirs, p_ids = plain_pair(tok, trl_prepare, "How many legs does a tripod have?\n### Response: ", "3")
    ids = ours["input_ids"]
    assert ids == theirs["input_ids"] and ids[-4:] == [42, SPACE, 35, EOS]
    assert ids[:len(p_ids)] == p_ids and len(p_ids) == len(ids) - 3
    assert ours["labels"][-3:] == [SPACE, 35, EOS] and theirs["labels"][-3:] == [IGNORE, 35, EOS]
    diff = np.flatnonzero(np.asarray(ours["labels"]) != np.asarray(theirs["labels"])).tolist()
    assert diff == [len(ids) - 3]


@pytest.mark.parametrize("prompt,completion,answer", [
    ("Say hi.\n### Response: ", "Hi", [21041]),                                        # " " merges into " Hi"
    ("Name the capital of France in one word. ### Answer:", "Paris", [7042]),          # 0.19.1 dropped this row
])
def test_boundary_agrees(tok, trl_prepare, prompt, completion, answer):
    """Where the prompt's last characters merge with the response (" Hi"), TRL starts the
    completion where the prompt's ids and the whole's diverge: the merged token is trained, as
    in ours. " ### Answer:" tokenizes differently after a space than alone, which made 0.19.1's
    response template miss and mask the whole row; 1.x has no template to miss."""
    ours, theirs, _ = plain_pair(tok, trl_prepare, prompt, completion)
    ids = ours["input_ids"]
    assert ids == theirs["input_ids"] and ours["labels"] == theirs["labels"]
    assert trained(ours["labels"]).tolist() == [len(ids) - 2, len(ids) - 1]
    assert ours["labels"][-2:] == answer + [EOS] == ids[-2:]


# -- 3. multi-turn chat (d) ---------------------------------------------------------------------

MULTI = [{"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And three plus three?"},
         {"role": "assistant", "content": "Six."}]


def test_multi_turn_chat(tok, trl_prepare):
    fmt = Formatter.build(tok, "completion", [], max_length=MAX_LENGTH, chat_template="auto")
    f = fmt.encode({"messages": MULTI})
    ids, ours = f["input_ids"], np.array(f["labels"])
    assert ids == tok.apply_chat_template(MULTI, tokenize=True)["input_ids"]
    four, six = enc(tok, "Four."), enc(tok, "Six.")
    assert four == [19622, 30] and six == [30263, 30]
    heads = [h + len(CHAT_HEADER) for h in find_all(ids, CHAT_HEADER)]
    assert len(heads) == 2
    turn1 = list(range(heads[0], heads[0] + len(four) + 1))       # "Four." <|im_end|>
    turn2 = list(range(heads[1], heads[1] + len(six) + 1))        # "Six." <|im_end|>
    assert [ids[p] for p in turn1] == four + [EOS] and [ids[p] for p in turn2] == six + [EOS]
    assert ids[-1] == NL and turn2[-1] == len(ids) - 2

    # Ours: both assistant turns, each with its <|im_end|>; nothing else.
    assert trained(ours).tolist() == turn1 + turn2
    assert ours[trained(ours)].tolist() == four + [EOS] + six + [EOS]
    for u in find_all(ids, USER_HEADER):  # no user token (header to its <|im_end|>) is trained
        end = ids.index(EOS, u)
        assert (ours[u:end + 1] == IGNORE).all()

    # TRL, the chat as prompt (three turns) and completion (the last): the last turn only, with
    # its <|im_end|> and the "\n" after it.
    (split,), _ = trl_prepare([{"prompt": MULTI[:3], "completion": MULTI[3:]}])
    assert split["input_ids"] == ids
    assert trained(split["labels"]).tolist() == turn2 + [len(ids) - 1]
    assert np.asarray(split["labels"])[turn1].tolist() == [IGNORE] * len(turn1)
    # TRL, the chat as `messages`: every token, the system prompt and the user's turns too.
    (whole,), _ = trl_prepare([{"messages": MULTI}])
    assert whole["input_ids"] == ids and whole["labels"] == ids
    # ... and assistant turns only need a template with {% generation %} markers.
    with pytest.raises(ValueError, match="not training-compatible"):
        trl_prepare([{"messages": MULTI}], assistant_only_loss=True)


# -- 4. padding (e) -----------------------------------------------------------------------------

def row_view(batch, i, k, side):
    """(ids, labels, attention) of row i's k real tokens, and the padding's (ids, attention, labels)."""
    w = batch["input_ids"].shape[1]
    real = slice(0, k) if side == "right" else slice(w - k, w)
    pad = slice(k, w) if side == "right" else slice(0, w - k)
    return ((batch["input_ids"][i, real].tolist(), batch["labels"][i, real].tolist(),
             batch["attention_mask"][i, real].tolist()),
            (batch["input_ids"][i, pad], batch["attention_mask"][i, pad], batch["labels"][i, pad]))


def check_padded(batch, feats, multiple, side) -> list:
    """Each row's real tokens kept and its padding masked; the short row's trained (position, id)."""
    longest = max(len(f["input_ids"]) for f in feats)
    w = batch["input_ids"].shape[1]
    assert batch["labels"].shape == batch["attention_mask"].shape == (len(feats), w)
    assert (w % 8 == 0 and longest <= w < longest + 8) if multiple else w == longest
    seen = []
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        (ids, labels, attn), (pad_ids, pad_attn, pad_labels) = row_view(batch, i, k, side)
        assert ids == f["input_ids"] and labels == f["labels"] and attn == [1] * k
        assert (pad_ids == EOS).all() and (pad_attn == 0).all() and (pad_labels == IGNORE).all()
        assert pad_ids.numel() == w - k
        if i == 0:
            seen = [(p, ids[p]) for p in trained(labels)]
    # The pad id is the EOS id, yet exactly one EOS per row is trained: the real one.
    is_eos = batch["input_ids"] == EOS
    assert ((batch["labels"] == EOS) == (is_eos & (batch["attention_mask"] == 1) & (batch["labels"] != IGNORE))).all()
    assert int((batch["labels"] == EOS).sum()) == len(feats)
    return seen


PAD_ROWS = [{"prompt": "Say hi.", "completion": "Hi!"},
            {"prompt": "Write one sentence about the sea.",
             "completion": "The sea is wide, deep and full of life, and it covers most of the Earth."}]


def test_padding_by_position(tok, trl_prepare):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    fmt = Formatter.build(tok, "completion", [], max_length=MAX_LENGTH, chat_template="auto")
    short, long = fmt.encode_many(PAD_ROWS)
    ns, nl = len(short["input_ids"]), len(long["input_ids"])
    assert ns % 8 and nl % 8 and nl > ns + 8    # both need padding; the long row widens the batch
    # The short row's trained tokens: "Hi!" and its <|im_end|> (id 2 == the pad id).
    assert [short["labels"][p] for p in trained(short["labels"])] == enc(tok, "Hi!") + [EOS]

    seen = {}
    for multiple in (8, None):
        for side in ("right", "left"):
            col = CompletionOnlyCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=multiple, padding_side=side)
            for name, feats in {"alone": [short], "with_long": [short, long]}.items():
                seen[(multiple, side, name)] = check_padded(col(feats), feats, multiple, side)
    assert len(seen) == 8
    assert all(v == seen[(8, "right", "alone")] for v in seen.values())  # padding changes nothing
    assert seen[(8, "right", "alone")][-1] == (ns - 2, EOS)

    # TRL's collator (right only) on the same features: the very batch ours makes, the row's own
    # <|im_end|> trained (0.19.1 masked it as a pad).
    feats = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in (short, long)]
    theirs = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(feats)
    ours = CompletionOnlyCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8, padding_side="right")(feats)
    assert theirs.keys() == ours.keys() == {"input_ids", "labels", "attention_mask"}
    assert all((theirs[k] == ours[k]).all() for k in ours)
    check_padded(theirs, feats, 8, "right")
    # ... and on the rows as TRL itself prepares them, where (a) adds each row's final "\n".
    prepared, collator = trl_prepare([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                       "completion": [{"role": "assistant", "content": r["completion"]}]}
                                      for r in PAD_ROWS], pad_to_multiple_of=8)
    assert isinstance(collator, DataCollatorForLanguageModeling) and collator.pad_to_multiple_of == 8
    batch = collator(prepared)
    assert (batch["input_ids"] == ours["input_ids"]).all() and (batch["attention_mask"] == ours["attention_mask"]).all()
    diff = (batch["labels"] != ours["labels"]).nonzero().tolist()
    assert diff == [[0, ns - 1], [1, nl - 1]] and batch["labels"][0, ns - 1] == batch["labels"][1, nl - 1] == NL
