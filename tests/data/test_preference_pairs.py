"""Preference pairs: every layout the loader reads (columns, chat, every file format, column
mapping), the pair checks of the data report, their tokens, and bad input refused in one line
with the file left as it was."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import SUBPROCESS_ENV, sst2_dev

from nb_finetune import UserError
from nb_finetune.config import DataConfig, RunConfig
from nb_finetune.data import prepare
from nb_finetune.data.collator import PairCollator
from nb_finetune.data.formatter import IGNORE, Formatter
from nb_finetune.data.tokens import tokenize_pairs
from nb_finetune.errors import ConfigError

PROMPT = "Write one sentence from a positive movie review."


@pytest.fixture
def sst2_pairs(shared_data) -> pd.DataFrame:
    """40 pairs from real SST-2 sentences: a positive one chosen, a negative one rejected."""
    dev = sst2_dev(shared_data)
    pos, neg = dev[dev.label == "1"].sentence.head(40), dev[dev.label == "0"].sentence.head(40)
    return pd.DataFrame({"prompt": [f"{PROMPT} ({i})" for i in range(40)], "chosen": pos.values,
                         "rejected": neg.values})


def chat_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """The same pairs in TRL's conversational layout: each side a whole chat."""
    def chat(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return pd.DataFrame({"chosen": [chat(p, c) for p, c in zip(frame.prompt, frame.chosen)],
                         "rejected": [chat(p, r) for p, r in zip(frame.prompt, frame.rejected)]})


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_pairs_read_from_every_format(tmp_path, sst2_pairs, suffix):
    path = tmp_path / f"pairs.{suffix}"
    mapped = sst2_pairs.rename(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    {"csv": lambda: mapped.to_csv(path, index=False), "tsv": lambda: mapped.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: mapped.to_json(path, orient="records", lines=True),
     "json": lambda: mapped.to_json(path, orient="records"), "parquet": lambda: mapped.to_parquet(path)}[suffix]()
    cfg = DataConfig(source=str(path), task="preference", prompt_column="question", chosen_column="good",
                     rejected_column="bad")
    prep = prepare(cfg)
    rows = pd.concat(prep.splits.values())
    assert list(rows.columns) == ["prompt", "chosen", "rejected"] and len(rows) == 40
    assert set(rows.chosen) == set(sst2_pairs.chosen) and set(rows.rejected) == set(sst2_pairs.rejected)


def test_chat_pairs_share_their_turns_as_the_prompt(tmp_path, sst2_pairs):
    path = tmp_path / "chat.jsonl"
    chat_pairs(sst2_pairs).to_json(path, orient="records", lines=True)
    rows = pd.concat(prepare(DataConfig(source=str(path), task="preference")).splits.values())
    first = rows.sort_values("chosen").iloc[0]
    assert first["messages"][0]["role"] == "user" and len(first["messages"]) == 1
    assert first["chosen"] in set(sst2_pairs.chosen)


def test_a_chat_prompt_column_with_text_answers(sst2_pairs):
    frame = sst2_pairs.assign(prompt=[[{"role": "system", "content": "Be kind."}, {"role": "user", "content": p}]
                                      for p in sst2_pairs.prompt])
    rows = pd.concat(prepare(DataConfig(task="preference"), frame).splits.values())
    assert all(len(m) == 2 for m in rows["messages"]) and rows["chosen"].isin(sst2_pairs.chosen).all()


def test_chats_that_differ_before_the_answer_are_refused(sst2_pairs):
    frame = chat_pairs(sst2_pairs)
    frame.at[3, "rejected"] = [{"role": "user", "content": "something else"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(UserError, match="row 3: the chosen and rejected chats differ before their last turn"):
        prepare(DataConfig(task="preference"), frame)


def check(report, name: str) -> dict:
    return report.checks.set_index("check").loc[name].to_dict()


def test_the_report_counts_pair_problems(sst2_pairs):
    frame = sst2_pairs.copy()
    frame.loc[0, "rejected"] = frame.loc[0, "chosen"]                        # one answer twice
    frame = pd.concat([frame, frame.iloc[[5]],                                  # a duplicate pair
                       frame.iloc[[7]].rename(columns={"chosen": "rejected", "rejected": "chosen"})],  # reversed
                      ignore_index=True)
    prep = prepare(DataConfig(task="preference", drop_duplicates=True), frame)
    report = prep.report
    assert check(report, "pairs: chosen same as rejected")["count"] == 1
    assert check(report, "pairs: duplicates")["count"] == 1
    assert check(report, "pairs: same prompt, contradicting pairs")["count"] == 2  # the pair and its reverse
    longer = (frame.chosen.str.len() > frame.rejected.str.len()).sum()
    assert check(report, "pairs: chosen is the longer answer")["count"] == longer
    assert report.to_dict()["chosen_longer"] == pytest.approx(longer / len(frame))
    kept = pd.concat(prep.splits.values())
    assert not (kept.chosen == kept.rejected).any() and len(kept) == len(frame) - 2  # same-answer and duplicate


def test_a_length_bias_is_a_warning(sst2_pairs):
    frame = sst2_pairs.assign(chosen=sst2_pairs.chosen + " And that is a long story, told with great care.")
    row = check(prepare(DataConfig(task="preference"), frame).report, "pairs: chosen is the longer answer")
    assert row["severity"] == "warning" and "length" in row["detail"]


def test_prompt_leakage_between_splits(sst2_pairs):
    frame = sst2_pairs.assign(prompt=PROMPT)  # one prompt for every pair
    report = prepare(DataConfig(task="preference"), frame).report
    assert check(report, "leakage: test prompts also in train")["share"] == 1.0


@pytest.mark.parametrize("change,message", [
    (lambda f: f.assign(rejected=f.chosen), "every pair's chosen answer equals its rejected one"),
    (lambda f: f.assign(rejected=[""] + list(f.rejected[1:])), r"row\(s\) 0 have no rejected answer"),
    (lambda f: f.drop(columns="rejected"), "column 'rejected' not found.*data.rejected_column"),
    (lambda f: f.drop(columns="prompt"), "column 'prompt' not found.*data.prompt_column"),
])
def test_bad_pairs_refused_in_one_line(sst2_pairs, change, message):
    with pytest.raises(UserError, match=message) as err:
        prepare(DataConfig(task="preference"), change(sst2_pairs))
    assert "\n" not in str(err.value)


def test_a_jsonl_pair_missing_a_side_from_the_command_line(tmp_path, sst2_pairs, tiny_model_dir):
    """One line naming the fix, exit status 2, no traceback, the file as it was."""
    path = tmp_path / "pairs.jsonl"
    records = sst2_pairs.to_dict("records")
    del records[4]["rejected"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    before = path.read_bytes()
    config = RunConfig.from_dict({"data": {"source": str(path), "task": "preference"}, "train": {"method": "dpo"},
                                  "model": {"name": str(tiny_model_dir)}}).save(tmp_path / "run.yaml")
    out = subprocess.run([sys.executable, "-m", "nb_finetune.cli", "validate", "--config", str(config)],
                         capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "row(s) 4 have no rejected answer" in out.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("settings,field,accepted", [
    ({"train": {"beta": 0}}, "train.beta", "above 0"),
    ({"train": {"beta": -0.5}}, "train.beta", "above 0"),
    ({"train": {"method": "dpo"}}, "train.method", "data.task='preference'"),
    ({"data": {"task": "preference"}}, "train.method", "'dpo' or 'orpo'"),
    ({"data": {"task": "preference"}, "train": {"method": "dpo"}, "model": {"objective": "head"}},
     "model.objective", "data.task='classification'"),
    ({"data": {"task": "preference"}, "train": {"method": "orpo", "packing": True}}, "train.packing", "false"),
])
def test_config_refuses_what_preference_tuning_cannot_do(settings, field, accepted):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(settings)
    found = {p.field: p.accepted for p in err.value.problems}
    assert field in found and accepted in found[field]


def test_pairs_tokenize_as_two_rows_with_the_prompt_masked(tokenizer, sst2_pairs):
    prep = prepare(DataConfig(task="preference"), sst2_pairs)
    fmt = Formatter.build(tokenizer, "preference", [], 128)
    ds, stats = tokenize_pairs(prep.splits["train"], fmt)
    assert len(ds) == len(prep.splits["train"]) and stats.dropped_no_trained == 0
    batch = PairCollator(tokenizer.pad_token_id, 8)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    for row in range(4):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = tokenizer.decode(ids[labels != IGNORE])
        pair = prep.splits["train"].iloc[row % 2]
        answer = pair.chosen if row < 2 else pair.rejected
        assert answer.strip() in trained and pair.prompt not in trained
        assert pair.prompt in tokenizer.decode(ids)
