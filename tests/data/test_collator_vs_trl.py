"""Our completion-only masks (`Formatter.encode` + `CompletionOnlyCollator`) against trl 0.19.1's
`DataCollatorForCompletionOnlyLM`, token by token, with the real SmolLM2-135M-Instruct tokenizer.

Both sides see the *same* token sequence (our `encode`'s input_ids); only the labels are compared.
Where they agree: every response content token. Where they are EXPECTED to differ (each asserted
explicitly below, position by position and in total):

 (a) the end-of-turn / EOS token. SmolLM2's pad token *is* its EOS token (<|im_end|>, id 2), and
     TRL's parent `DataCollatorForLanguageModeling.torch_call` does `labels[labels == pad_token_id]
     = -100`, so TRL never trains the token that ends a response (the model never learns to stop).
     Ours trains it (chat: the template's <|im_end|>; plain text: the EOS we append).
 (b) chat template only: TRL trains everything after the response template to the end of the row,
     so it trains the "\n" (id 198) that the template puts after the final <|im_end|>. Ours does not.
 (c) (fixed) plain text: `Formatter.render` joins prompt and response with a " " separator, and
     before a digit SmolLM2 makes that separator a token of its own (" ", id 216). It belongs to
     the response span, so ours trains it, as TRL does, and generation (`prompt_ids`) starts
     right before it; `test_plain_separator_token_is_trained` keeps it that way.

And where TRL fails outright and ours does not:
 (i)   a response template whose ids alone differ from its ids in context: TRL warns and masks the
       whole row (nothing trained);
 (ii)  multi-turn chats: with a response template only, TRL trains just the last assistant turn;
       with an instruction template too it trains every turn but still no <|im_end|> (and the "\n");
 (iii) padding is told apart by position in ours (width a multiple of 8, pad label -100, trained
       tokens independent of the batch).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
if trl.__version__ != "0.19.1":  # the collator was removed in 0.20; behaviours below are 0.19.1's
    pytest.skip(f"these tests pin trl==0.19.1 (found {trl.__version__})", allow_module_level=True)
from conftest import SHARED_DATA, alpaca  # noqa: E402
from trl import DataCollatorForCompletionOnlyLM  # noqa: E402

from nb_finetune import config, modeling  # noqa: E402
from nb_finetune.data.collator import CompletionOnlyCollator  # noqa: E402
from nb_finetune.data.formatter import IGNORE, Formatter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This class is deprecated:DeprecationWarning")

ALPACA = SHARED_DATA / "alpaca_demo" / "alpaca_en_demo.json"
N_ROWS = 100

# SmolLM2-135M-Instruct token ids this file relies on (checked in test_tokenizer_facts).
EOS = 2                                   # <|im_end|>: eos_token_id == pad_token_id
NL = 198                                  # "\n"
SPACE = 216                               # " " on its own
CHAT_HEADER = [1, 520, 9531, 198]         # "<|im_start|>assistant\n"
USER_HEADER = [1, 4093, 198]              # "<|im_start|>user\n"
PLAIN_TEMPLATE = [3757, 14212, 42]        # "### Response:"  (same ids alone and after "\n")


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)


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


def trl_collate(collator, id_lists: list[list[int]]):
    """TRL's labels for the given sequences, and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collator([{"input_ids": ids} for ids in id_lists])
    msgs = [str(w.message) for w in caught if "deprecated" not in str(w.message)]
    return batch, msgs


def trained(labels) -> np.ndarray:
    return np.flatnonzero(np.asarray(labels) != IGNORE)


def find_all(ids: list[int], sub: list[int]) -> list[int]:
    """Start positions of `sub` in `ids`."""
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


def test_tokenizer_facts(tok):
    """The ids hard-coded above, and the pad == eos setup that makes difference (a) happen."""
    assert tok.is_fast
    assert tok.eos_token_id == tok.pad_token_id == EOS
    assert tok.convert_ids_to_tokens(EOS) == "<|im_end|>"
    assert enc(tok, "<|im_start|>assistant\n") == CHAT_HEADER
    assert enc(tok, "<|im_start|>user\n") == USER_HEADER
    assert enc(tok, "### Response:") == PLAIN_TEMPLATE
    assert enc(tok, "\n### Response:") == [NL] + PLAIN_TEMPLATE
    assert enc(tok, ": 3") == [42, SPACE, 35]           # a digit does not absorb the space before it
    assert enc(tok, ": Hi") == [42, 21041]              # a word does (" Hi")
    assert tok.decode([21041]) == " Hi"


# -- 1. real data: same tokens, labels compared position by position ---------------------------

# Exact tallies on the first 100 Alpaca demo rows (fixed data, fixed tokenizer).
# Row 63 is longer than 512 tokens: its response is cut, so it has no end-of-turn token at all
# and no difference (a)/(b); in chat mode its prompt is cut too, and two more prompts are cut
# in the middle, with the response template kept, so TRL still finds it.
EXPECTED = {
    # mode: (rows with diff (a), rows with diff (b), rows with diff (c), rows with a cut response)
    "plain": (99, 0, 0, 1),
    "chat": (99, 99, 0, 1),
}


def _rows_for(mode: str, alpaca_rows: list[dict]) -> list[dict]:
    if mode == "chat":
        return alpaca_rows
    # Plain text: a prompt ending in the response template, so TRL's template matching can work.
    return [{"prompt": f"### Instruction:\n{r['prompt']}\n\n### Response:", "completion": r["completion"]}
            for r in alpaca_rows]


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_masks_match_trl_except_documented_differences(tok, alpaca_rows, mode):
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="no" if mode == "plain" else "auto")
    assert fmt.use_chat == (mode == "chat")
    rows = _rows_for(mode, alpaca_rows)
    feats = [fmt.encode(r) for r in rows]
    template = CHAT_HEADER if mode == "chat" else PLAIN_TEMPLATE
    collator = DataCollatorForCompletionOnlyLM(template, tokenizer=tok, mlm=False)
    batch, msgs = trl_collate(collator, [f["input_ids"] for f in feats])
    assert msgs == []  # TRL found the template in every row (no "Could not find response key")
    assert torch.equal(batch["input_ids"][:, :1], torch.tensor([[f["input_ids"][0]] for f in feats]))

    n_a = n_b = n_c = n_cut = agreed = 0
    for i, (row, f) in enumerate(zip(rows, feats)):
        ids = np.array(f["input_ids"])
        ours = np.array(f["labels"])
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]  # identical token sequences
        theirs = batch["labels"][i].numpy()
        assert (theirs[n:] == IGNORE).all()                           # TRL's own padding
        theirs = theirs[:n]
        assert trained(ours).size and trained(theirs).size, f"row {i}: a side trains nothing"

        # (a) ours trains the EOS / <|im_end|> that closes the response; TRL masks it (pad == eos).
        diff_a = [int(p) for p in trained(ours) if ids[p] == EOS]
        for p in diff_a:
            assert ours[p] == EOS and theirs[p] == IGNORE
        # (b) chat: TRL trains the "\n" after the final <|im_end|>; ours does not.
        diff_b = [n - 1] if mode == "chat" and diff_a and diff_a[-1] == n - 2 and ids[n - 1] == NL else []
        # (c) plain: a lone " " separator before a digit-first response (now trained, so none).
        first = int(trained(theirs)[0])
        diff_c = [first] if mode == "plain" and ids[first] == SPACE and ours[first] == IGNORE else []
        for p in diff_b + diff_c:
            assert theirs[p] == ids[p] and ours[p] == IGNORE

        # Everything else agrees token by token: same trained positions, same label ids.
        diff = sorted(int(p) for p in np.flatnonzero(ours != theirs))
        assert diff == sorted(diff_a + diff_b + diff_c), (
            f"row {i}: unexpected differences at {diff}: "
            + str([(tok.decode([int(ids[p])]), int(ours[p]), int(theirs[p])) for p in diff]))
        content = trained(theirs)
        content = content[~np.isin(content, diff_b + diff_c)]
        assert (ours[content] == theirs[content]).all() and (ours[content] == ids[content]).all()
        agreed += content.size

        # Where each side starts training: TRL right after the (last) template match; ours too,
        # except for the separator of (c), which neither the prompt nor the labels cover.
        after_template = find_all(f["input_ids"], template)[-1] + len(template)
        assert first == after_template and (theirs[:first] == IGNORE).all()
        assert int(trained(ours)[0]) == first + len(diff_c)

        # Generation starts from prompt_ids: the trained tokens must follow it directly.
        if not f["prompt_truncated"]:
            p_ids = fmt.prompt_ids(row)
            assert f["input_ids"][:len(p_ids)] == p_ids
            assert (int(trained(ours)[0]) == len(p_ids)) == (not diff_c)

        if f["response_truncated"]:
            assert not diff_a and not diff_b and ours[-1] != IGNORE and n == 512
            n_cut += 1
        else:
            assert len(diff_a) == 1 and diff_a[0] >= n - 2  # exactly one end-of-turn, at the end
        n_a += bool(diff_a)
        n_b += bool(diff_b)
        n_c += bool(diff_c)

    assert (n_a, n_b, n_c, n_cut) == EXPECTED[mode]
    assert agreed > 10_000  # the agreement covers real responses, not a handful of tokens


def test_plain_separator_rows_are_digit_first(tok, alpaca_rows):
    """A lone " " separator appears exactly on the rows whose response starts with a digit, and
    ours trains it there (it is the first trained token)."""
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="no")
    rows = _rows_for("plain", alpaca_rows)
    lone_space = []
    for r in rows:
        f = fmt.encode(r)
        k = int(trained(f["labels"])[0])
        lone_space.append(f["input_ids"][k] == SPACE)
    digit_first = [r["completion"][:1].isdigit() for r in rows]
    assert lone_space == digit_first and sum(lone_space) == 16


def test_plain_separator_token_is_trained(tok):
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="no")
    row = {"prompt": "How many legs does a tripod have?\n### Response:", "completion": "3"}
    f, p_ids = fmt.encode(row), fmt.prompt_ids(row)
    # input_ids end ":", " ", "3", EOS; generation starts after ":", so " ", "3" and EOS are all trained.
    assert f["input_ids"][:len(p_ids)] == p_ids
    assert f["input_ids"][-3:] == [SPACE, 35, EOS]
    assert all(x != IGNORE for x in f["labels"][len(p_ids):])


# -- 2(i). a response template that tokenizes differently in context --------------------------

def test_template_tokenized_differently_in_context(tok):
    template = "### Answer:"
    alone = enc(tok, template)
    assert alone == [3757, 19842, 42]
    row = {"prompt": "Name the capital of France in one word. ### Answer:", "completion": "Paris"}
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="no")
    f = fmt.encode(row)
    ids = f["input_ids"]
    # After a space (no newline) "###" becomes " ###" (20749): the template's ids never occur.
    assert find_all(ids, alone) == []
    in_context = [20749, 19842, 42]
    assert len(find_all(ids, in_context)) == 1

    collator = DataCollatorForCompletionOnlyLM(template, tokenizer=tok, mlm=False)
    assert collator.response_token_ids == alone
    batch, msgs = trl_collate(collator, [ids])
    assert len(msgs) == 1 and msgs[0].startswith("Could not find response key `### Answer:`")
    assert (batch["labels"] == IGNORE).all()  # TRL: the whole row is dropped from the loss

    # Ours: exactly " Paris" and the EOS, the last two tokens.
    paris = enc(tok, " Paris")
    assert paris == [7042]
    assert trained(f["labels"]).tolist() == [len(ids) - 2, len(ids) - 1]
    assert [f["labels"][-2], f["labels"][-1]] == ids[-2:] == paris + [EOS]

    # TRL's documented workaround (pass the in-context ids) finds it, and then only (a) differs.
    collator = DataCollatorForCompletionOnlyLM(in_context, tokenizer=tok, mlm=False)
    batch, msgs = trl_collate(collator, [ids])
    assert msgs == []
    assert batch["labels"][0].tolist() == [IGNORE] * (len(ids) - 2) + paris + [IGNORE]


# -- 2(ii). multi-turn chat ------------------------------------------------------------------

MULTI = [{"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And three plus three?"},
         {"role": "assistant", "content": "Six."}]


def test_multi_turn_chat(tok):
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="auto")
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

    # TRL, response template only: trains from the LAST match to the end. The first assistant
    # turn is lost; the last loses its <|im_end|> (pad == eos) and gains the trailing "\n".
    collator = DataCollatorForCompletionOnlyLM(CHAT_HEADER, tokenizer=tok, mlm=False)
    batch, msgs = trl_collate(collator, [ids])
    theirs = batch["labels"][0].numpy()
    assert msgs == []
    assert trained(theirs).tolist() == turn2[:-1] + [len(ids) - 1]
    assert theirs[trained(theirs)].tolist() == six + [NL]
    assert (theirs[turn1] == IGNORE).all()

    # TRL with the user header as instruction template: every turn, but still no <|im_end|>,
    # and each turn's "\n" after it is trained; it also warns about pad == eos.
    with pytest.warns(UserWarning, match="pad_token_id and eos_token_id values of this tokenizer are identical"):
        collator = DataCollatorForCompletionOnlyLM(CHAT_HEADER, instruction_template=USER_HEADER,
                                                   tokenizer=tok, mlm=False)
    batch, msgs = trl_collate(collator, [ids])
    theirs = batch["labels"][0].numpy()
    assert collator.instruction_token_ids == USER_HEADER
    assert msgs == []
    assert trained(theirs).tolist() == turn1[:-1] + [turn1[-1] + 1] + turn2[:-1] + [turn2[-1] + 1]
    assert theirs[trained(theirs)].tolist() == four + [NL] + six + [NL]


# -- 2(iii). padding -------------------------------------------------------------------------

def test_padding_by_position(tok):
    fmt = Formatter.build(tok, "completion", [], max_length=512, chat_template="auto")
    short = fmt.encode({"prompt": "Say hi.", "completion": "Hi!"})
    long = fmt.encode({"prompt": "Write one sentence about the sea.",
                       "completion": "The sea is wide, deep and full of life, and it covers most of the Earth."})
    ns, nl = len(short["input_ids"]), len(long["input_ids"])
    assert ns % 8 and nl % 8 and nl > ns + 8    # both need padding; the long row widens the batch
    # The short row's trained tokens: "Hi!" and its <|im_end|> (id 2 == the pad id).
    assert [short["labels"][p] for p in trained(short["labels"])] == enc(tok, "Hi!") + [EOS]

    def row_view(batch, i, k, side):
        """(ids, labels) of row i's real tokens, and the padding's (ids, attention, labels)."""
        w = batch["input_ids"].shape[1]
        real = slice(0, k) if side == "right" else slice(w - k, w)
        pad = slice(k, w) if side == "right" else slice(0, w - k)
        return ((batch["input_ids"][i, real].tolist(), batch["labels"][i, real].tolist(),
                 batch["attention_mask"][i, real].tolist()),
                (batch["input_ids"][i, pad], batch["attention_mask"][i, pad], batch["labels"][i, pad]))

    seen = {}
    for multiple in (8, None):
        for side in ("right", "left"):
            col = CompletionOnlyCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=multiple,
                                         padding_side=side)
            for name, feats in {"alone": [short], "with_long": [short, long], "long_first": [long, short]}.items():
                batch = col([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])
                longest = max(len(f["input_ids"]) for f in feats)
                w = batch["input_ids"].shape[1]
                assert batch["labels"].shape == batch["attention_mask"].shape == (len(feats), w)
                if multiple:
                    assert w % 8 == 0 and longest <= w < longest + 8
                else:
                    assert w == longest
                for i, f in enumerate(feats):
                    k = len(f["input_ids"])
                    (ids, labels, attn), (pad_ids, pad_attn, pad_labels) = row_view(batch, i, k, side)
                    assert ids == f["input_ids"] and labels == f["labels"] and attn == [1] * k
                    assert (pad_ids == EOS).all() and (pad_attn == 0).all() and (pad_labels == IGNORE).all()
                    assert pad_ids.numel() == w - k
                    if f is short:
                        seen[(multiple, side, name)] = [(p, ids[p]) for p in trained(labels)]
                # The pad id is the EOS id, yet exactly one EOS per row is trained: the real one.
                is_eos = batch["input_ids"] == EOS
                assert ((batch["labels"] == EOS) == (is_eos & (batch["attention_mask"] == 1)
                                                     & (batch["labels"] != IGNORE))).all()
                assert int((batch["labels"] == EOS).sum()) == len(feats)
    assert len(seen) == 12
    assert all(v == seen[(8, "right", "alone")] for v in seen.values())  # padding changes nothing
    assert seen[(8, "right", "alone")][-1] == (ns - 2, EOS)

    # TRL on the same padded batch: pads are masked too, but so is the row's own <|im_end|>.
    collator = DataCollatorForCompletionOnlyLM(CHAT_HEADER, tokenizer=tok, mlm=False, pad_to_multiple_of=8)
    batch, msgs = trl_collate(collator, [short["input_ids"], long["input_ids"]])
    assert msgs == [] and batch["input_ids"].shape[1] % 8 == 0
    assert int((batch["labels"] == EOS).sum()) == 0
    assert batch["labels"][0, :ns].tolist() == [IGNORE] * (ns - 4) + enc(tok, "Hi!") + [IGNORE, NL]
