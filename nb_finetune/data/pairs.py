"""Checks for preference pairs (prompt, chosen, rejected): what makes a pair teach nothing, teach
the opposite, or teach something else than meant (a length bias)."""
from __future__ import annotations

import pandas as pd

from ..errors import UserError
from .columns import prompt_key


def check_pairs(report, frame: pd.DataFrame) -> None:
    """Add the pair checks to a DataReport; a pair missing a side, or pairs that are all one
    answer twice, are errors."""
    n = len(frame)
    for side in ("chosen", "rejected"):
        empty = frame.index[frame[side].str.strip() == ""]
        if len(empty):
            rows = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise UserError(f"row(s) {rows} have no {side} answer; fill data.{side}_column in every row or "
                            "remove those rows")
    same = frame["chosen"].str.strip() == frame["rejected"].str.strip()
    if same.all():
        raise UserError("every pair's chosen answer equals its rejected one; point data.chosen_column and "
                        "data.rejected_column at two different answers")
    report.add("pairs: chosen same as rejected", int(same.sum()), n, "warning" if same.any() else "ok",
               "rows dropped" if same.any() else "")
    dup = int(pair_keys(frame).duplicated().sum())
    report.add("pairs: duplicates", dup, n, "warning" if dup else "ok", "")
    flipped = contradicting(frame)
    report.add("pairs: same prompt, contradicting pairs", flipped, n, "warning" if flipped else "ok",
               "a pair and its reverse both present" if flipped else "")
    lengths = pd.DataFrame({"chosen": frame["chosen"].str.len(), "rejected": frame["rejected"].str.len()})
    report.pair_lengths = lengths
    longer = float((lengths["chosen"] > lengths["rejected"]).mean())
    # A model can learn "prefer the longer answer" in place of what the pairs mean to teach.
    biased = abs(longer - 0.5) > 0.25
    report.add("pairs: chosen is the longer answer", int((lengths["chosen"] > lengths["rejected"]).sum()), n,
               "warning" if biased else "ok", "length bias: the model may learn length" if biased else "")


def pair_keys(frame: pd.DataFrame) -> pd.Series:
    return prompt_key(frame) + "\x00" + frame["chosen"] + "\x00" + frame["rejected"]


def contradicting(frame: pd.DataFrame) -> int:
    """Pairs whose reverse (same prompt, answers swapped) is also in the data; a pair of one
    answer twice is its own reverse and is counted apart."""
    forward = set(pair_keys(frame))
    reverse = prompt_key(frame) + "\x00" + frame["rejected"] + "\x00" + frame["chosen"]
    return int((reverse.isin(forward) & (frame["chosen"] != frame["rejected"])).sum())


def check_prompt_leakage(splits: dict[str, pd.DataFrame], report) -> None:
    """How many validation and test prompts also have a pair in the training split."""
    train_prompts = set(prompt_key(splits["train"]))
    for name in ("validation", "test"):
        if len(splits[name]):
            shared = int(prompt_key(splits[name]).isin(train_prompts).sum())
            report.add(f"leakage: {name} prompts also in train", shared, len(splits[name]),
                       "warning" if shared else "ok", "")
