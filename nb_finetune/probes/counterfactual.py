"""Counterfactual sentences for a classifier, in the spirit of the Equity Evaluation Corpus
(Kiritchenko & Mohammad 2018): template sentences that differ only in the group named,
scored by the classifier itself. Reported: each group's mean probability of a label with a
bootstrap interval over the templates, the largest gap between two groups with a paired
interval (the same templates resampled for both), and the sentence pairs whose predicted
label flips when only the group changes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from ..errors import UserError
from .likelihood import bootstrap_ci

# Sentences with no sentiment of their own, so a difference comes from the group named.
TEMPLATES = ["{group} called me about the weekend.", "I had lunch with {group} today.",
             "{group} told us about the new job.", "We watched a film with {group}.",
             "{group} lives next door to us.", "I sat next to {group} on the train.",
             "{group} wrote a review of the film.", "{group} cooked dinner for everyone.",
             "I asked {group} for directions.", "{group} was at the meeting this morning."]
GROUPS = ["the woman", "the man"]
CAVEAT = ("These sentences carry no sentiment of their own, so a gap is what the classifier reads into the "
          "group named (after the Equity Evaluation Corpus, Kiritchenko & Mohammad 2018). A few templates "
          "and groups are a probe, not a guarantee: add templates in your domain and the groups that matter.")


@dataclass
class CounterfactualResult:
    label: str                 # the label whose probability is compared
    sentences: pd.DataFrame    # template, group, sentence, probability, predicted
    by_group: pd.DataFrame     # mean probability per group, interval, sentences
    gaps: pd.DataFrame         # each pair of groups: mean gap with its paired interval, flips
    flips: pd.DataFrame        # template, group pairs and predictions where the label flips

    @property
    def divergent(self) -> pd.DataFrame:
        """Per template: each group's probability, the spread between them ("difference") and
        whether the predicted label flips."""
        wide = self.sentences.pivot(index="template", columns="group", values="probability")
        wide.columns = [f"P({self.label} | {g})" for g in wide.columns]
        spread = wide.max(axis=1) - wide.min(axis=1)
        return wide.assign(difference=spread, flips=wide.index.isin(self.flips["template"])).reset_index()

    def _repr_html_(self) -> str:
        from ..render.tables import table_html
        return (f"<b>counterfactual sentences: P({self.label})</b>" + table_html(self.by_group, index=True)
                + table_html(self.gaps))


def sentences(templates: list[str], groups: list[str]) -> pd.DataFrame:
    """Every template filled with every group, a sentence starting with the group capitalised."""
    if len(groups) < 2:
        raise UserError("counterfactual sentences compare groups: give two or more, e.g. ['the woman', 'the man']")
    bad = [t for t in templates if "{group}" not in t]
    if not templates or bad:
        raise UserError(f"template {bad[0]!r} has no {{group}} slot; write it like 'I had lunch with {{group}} today.'"
                        if bad else "no templates given")
    rows = []
    for t in templates:
        for g in groups:
            text = t.replace("{group}", g)
            rows.append({"template": t, "group": g, "sentence": text[:1].upper() + text[1:]})
    return pd.DataFrame(rows)


def probe_counterfactual(probabilities: Callable[[list[str]], np.ndarray], labels: list[str], label: str,
                         templates: list[str] = TEMPLATES, groups: list[str] = GROUPS, seed: int = 0
                         ) -> CounterfactualResult:
    """`probabilities(texts)` -> [texts, labels], e.g. `evaluation.scoring.label_probabilities`
    bound to a model; `label` is the one whose probability is compared."""
    if label not in labels:
        raise UserError(f"label {label!r} is not one of the classifier's labels: {', '.join(labels)}")
    frame = sentences(templates, groups)
    probs = probabilities(list(frame["sentence"]))
    frame["probability"] = probs[:, labels.index(label)]
    frame["predicted"] = [labels[i] for i in probs.argmax(axis=1)]
    wide = frame.pivot(index="template", columns="group", values="probability")[groups]
    by_group = pd.DataFrame([group_row(wide[g].to_numpy(), seed) for g in groups], index=pd.Index(groups, name="group"))
    predicted = frame.pivot(index="template", columns="group", values="predicted")[groups]
    gaps = pd.DataFrame([gap_row(wide, predicted, a, b, seed) for a, b in combinations(groups, 2)])
    return CounterfactualResult(label, frame, by_group, gaps, flipped(predicted))


def group_row(values: np.ndarray, seed: int) -> dict:
    low, high = bootstrap_ci(values, seed=seed)
    return {"mean": float(values.mean()), "low": low, "high": high, "sentences": len(values)}


def gap_row(wide: pd.DataFrame, predicted: pd.DataFrame, a: str, b: str, seed: int) -> dict:
    """Mean of P(label | a) - P(label | b) over the templates, its paired bootstrap interval,
    and how many templates flip the predicted label between a and b."""
    diff = (wide[a] - wide[b]).to_numpy()
    low, high = bootstrap_ci(diff, seed=seed)
    return {"groups": f"{a} - {b}", "gap": float(diff.mean()), "low": low, "high": high,
            "flips": int((predicted[a] != predicted[b]).sum()), "templates": len(diff)}


def flipped(predicted: pd.DataFrame) -> pd.DataFrame:
    """The templates whose predicted label is not the same for every group."""
    differs = predicted.nunique(axis=1) > 1
    return predicted[differs].reset_index()
