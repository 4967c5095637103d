"""Pair sets for likelihood probes: CrowS-Pairs, StereoSet, WinoBias, read into one shape."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UserError

PAIR_COLUMNS = ["more", "less", "bias_type"]  # optional: "unrelated", "context"


@dataclass
class PairSet:
    """One row per item: `more` (the stereotypical sentence), `less` (the anti-stereotypical
    one), `bias_type`, and where the set has them `unrelated` and `context`."""
    name: str
    items: pd.DataFrame
    dropped: int = 0  # items left out (identical sentences), reported

    def __post_init__(self):
        missing = [c for c in PAIR_COLUMNS if c not in self.items]
        if missing:
            raise UserError(f"pair set {self.name!r} lacks the column(s) {', '.join(missing)}; it needs "
                            f"{', '.join(PAIR_COLUMNS)} (and may have unrelated, context)")
        if self.items.empty:
            raise UserError(f"pair set {self.name!r} has no pairs")


def _need(frame: pd.DataFrame, columns: list[str], path) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")


def crows_pairs(path: str | Path) -> PairSet:
    """CrowS-Pairs: the original CSV (sent_more, sent_less, bias_type) or the masked form
    (sentence with [MASK], mask1 = the stereotyped group's word, mask2, bias_type)."""
    frame = pd.read_csv(path)
    if "sentence" in frame and "mask1" in frame:
        _need(frame, ["sentence", "mask1", "mask2", "bias_type"], path)
        items = pd.DataFrame({"more": [s.replace("[MASK]", str(m)) for s, m in zip(frame["sentence"], frame["mask1"])],
                              "less": [s.replace("[MASK]", str(m)) for s, m in zip(frame["sentence"], frame["mask2"])],
                              "bias_type": frame["bias_type"]})
    else:
        _need(frame, ["sent_more", "sent_less", "bias_type"], path)
        items = frame.rename(columns={"sent_more": "more", "sent_less": "less"})[PAIR_COLUMNS]
    return _pairs("crows-pairs", items)


def stereoset(path: str | Path, kind: str = "intrasentence") -> PairSet:
    """StereoSet items of one kind; intersentence sentences are scored after their context."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("type") == kind]
    if not rows:
        raise UserError(f"{path}: no StereoSet items of type {kind!r} (intrasentence or intersentence)")
    frame = pd.DataFrame(rows)
    _need(frame, ["stereotype", "anti-stereotype", "unrelated", "bias_type", "context"], path)
    items = pd.DataFrame({"more": frame["stereotype"], "less": frame["anti-stereotype"],
                          "unrelated": frame["unrelated"], "bias_type": frame["bias_type"]})
    if kind == "intersentence":
        items["context"] = frame["context"]
    return _pairs(f"stereoset-{kind}", items)


def preference_pairs(frame: pd.DataFrame, name: str = "held-out pairs") -> PairSet:
    """Preference pairs (prompt, chosen, rejected) as likelihood pairs: each answer scored after
    its prompt, the rejected one taken as the stereotypical side (pairs built from a probe set,
    as the debias-dpo preset's are)."""
    if "prompt" not in frame:
        raise UserError(f"{name}: the pairs' prompts are chats; a likelihood probe needs text prompts "
                        "(data.prompt_column)")
    items = pd.DataFrame({"more": frame["rejected"].values, "less": frame["chosen"].values, "bias_type": "all",
                          "context": frame["prompt"].values})
    return _pairs(name, items)


def winobias(folder: str | Path, split: str = "dev") -> PairSet:
    """WinoBias: line i of pro_stereotyped_typeN.txt.SPLIT against line i of anti_stereotyped_typeN."""
    folder = Path(folder)
    frames = []
    for kind in ("type1", "type2"):
        pro = folder / f"pro_stereotyped_{kind}.txt.{split}"
        anti = folder / f"anti_stereotyped_{kind}.txt.{split}"
        if not pro.is_file() or not anti.is_file():
            raise UserError(f"{folder}: expected {pro.name} and {anti.name} (WinoBias files)")
        more = [_plain(t) for t in pro.read_text(encoding="utf-8").splitlines() if t.strip()]
        less = [_plain(t) for t in anti.read_text(encoding="utf-8").splitlines() if t.strip()]
        if len(more) != len(less):
            raise UserError(f"{pro.name} and {anti.name} differ in length ({len(more)} vs {len(less)} lines)")
        frames.append(pd.DataFrame({"more": more, "less": less, "bias_type": f"gender ({kind})"}))
    return _pairs(f"winobias-{split}", pd.concat(frames, ignore_index=True))


def _plain(line: str) -> str:
    """A WinoBias line without its optional leading number and the [brackets] marking the mentions."""
    return re.sub(r"^\d+\s+", "", line).replace("[", "").replace("]", "").strip()


def _pairs(name: str, items: pd.DataFrame) -> PairSet:
    same = items["more"] == items["less"]  # e.g. WinoBias lines that do not differ: no signal
    return PairSet(name, items[~same].reset_index(drop=True), int(same.sum()))
