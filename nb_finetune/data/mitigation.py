"""Data-side mitigations for what the bias probes find, applied to the training split only
(never to validation or test) and reported:
- counterfactual augmentation: a copy of each training row that mentions a group term, with
  the terms swapped ("he" <-> "she"), so both versions are learned alike;
- reweighting by group: rows of smaller groups drawn again (seeded) until every group has as
  many rows as the largest, the resampling form of weighting the loss by 1 / group size.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import UserError

# Editable: pass your own list of (term, counterpart) pairs. Swaps go both ways.
GENDER_TERMS = [("he", "she"), ("him", "her"), ("his", "her"), ("man", "woman"), ("men", "women"),
                ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("son", "daughter"),
                ("brother", "sister"), ("husband", "wife"), ("king", "queen"), ("mr", "mrs"),
                ("male", "female"), ("gentleman", "lady"), ("actor", "actress"), ("uncle", "aunt")]


def swap_map(terms) -> dict[str, str]:
    if not terms:
        raise UserError("the term list is empty; give pairs like [['he', 'she'], ['man', 'woman']]")
    mapping: dict[str, str] = {}
    for pair in terms:
        if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise UserError(f"term pair {pair!r}: write two words, e.g. ['he', 'she']")
        a, b = (t.strip().lower() for t in pair)
        mapping.setdefault(a, b)  # the first pair wins: 'her' -> 'him' and 'his' -> 'her' stay one-to-one-ish
        mapping.setdefault(b, a)
    return mapping


def swap_terms(text: str, mapping: dict[str, str]) -> str:
    """Swap whole words, keeping capitalisation ("He" -> "She", "MEN" -> "WOMEN")."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True))) + r")\b",
                         re.IGNORECASE)

    def repl(m):
        word, new = m.group(0), mapping[m.group(0).lower()]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return pattern.sub(repl, text)


def counterfactual_augment(frame: pd.DataFrame, terms=GENDER_TERMS, columns=("text", "prompt", "completion")
                           ) -> tuple[pd.DataFrame, int]:
    """The frame plus a swapped copy of every row whose text mentions a term; (frame, copies)."""
    mapping = swap_map(terms)
    cols = [c for c in columns if c in frame]
    if not cols:
        raise UserError(f"counterfactual augmentation needs a text column ({', '.join(columns)})")
    swapped = frame.copy()
    for c in cols:
        swapped[c] = frame[c].astype(str).map(lambda t: swap_terms(t, mapping))
    changed = np.zeros(len(frame), bool)
    for c in cols:
        changed |= (swapped[c] != frame[c].astype(str)).to_numpy()
    copies = swapped[changed]
    return pd.concat([frame, copies], ignore_index=True), int(changed.sum())


def term_groups(frame: pd.DataFrame, groups: dict[str, list[str]], column: str = "text") -> pd.Series:
    """Each row's group by the terms it mentions ('mixed' for several groups, 'none' for none)."""
    patterns = {g: re.compile(r"\b(" + "|".join(map(re.escape, ws)) + r")\b", re.IGNORECASE)
                for g, ws in groups.items()}

    def which(text):
        hits = [g for g, p in patterns.items() if p.search(text)]
        return hits[0] if len(hits) == 1 else ("mixed" if hits else "none")

    return frame[column].astype(str).map(which)


def reweight(frame: pd.DataFrame, group: pd.Series, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Rows of each group drawn again until all groups are as large as the largest.
    Returns the frame and {group: (rows before, rows after)}."""
    counts = group.value_counts()
    if len(counts) < 2:
        raise UserError("reweighting needs two or more groups in the training rows; found "
                        + (", ".join(map(str, counts.index)) or "none"))
    rng = np.random.default_rng(seed)
    target = counts.max()
    parts, effect = [], {}
    for g, n in counts.items():
        idx = np.flatnonzero((group == g).to_numpy())
        extra = rng.choice(idx, target - n, replace=True) if target > n else np.array([], int)
        parts.append(np.concatenate([idx, extra]))
        effect[g] = (int(n), int(target))
    out = frame.iloc[np.sort(np.concatenate(parts))].reset_index(drop=True)
    return out, effect


def mitigate(train: pd.DataFrame, cfg: DataConfig, report) -> pd.DataFrame:
    """Counterfactual augmentation and reweighting of the training split, each reported."""
    text = "text" if "text" in train else "prompt"
    if cfg.counterfactual:
        train, copies = counterfactual_augment(train, cfg.counterfactual_terms or GENDER_TERMS)
        report.add("counterfactual copies added to train", copies, len(train) - copies, "ok",
                   "group terms swapped" if copies else "no row mentions a term")
    if cfg.reweight_groups:
        groups = term_groups(train, cfg.reweight_groups, text)
        named = groups.isin(list(cfg.reweight_groups))
        balanced, effect = reweight(train[named], groups[named], cfg.seed)
        train = pd.concat([balanced, train[~named]], ignore_index=True)
        report.add("rows drawn again to balance groups", sum(after - before for before, after in effect.values()),
                   len(train), "ok", ", ".join(f"{g}: {b} -> {a}" for g, (b, a) in effect.items()))
    return train
