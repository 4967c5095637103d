"""A scan of training rows for what they could teach about groups, before any training:
how often each group is mentioned, and, for labelled data, whether the rows that mention a
group carry a label more or less often than the rows that name no group of its axis (the
baseline), with intervals.

A row mentions a group when it contains one of the group's terms as a whole word. A group is
flagged when the interval of the difference between its label share and the baseline's
excludes 0; intervals are Wilson (shares) and Newcombe (differences), widened together
(Bonferroni) so that the chance of any false flag in one scan stays near 5%.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from ..errors import UserError

# Editable through data.scan_groups: {axis: {group: [terms]}}. Terms are whole words, any case.
DEFAULT_GROUPS: dict[str, dict[str, list[str]]] = {
    "gender": {
        "female": ["woman", "women", "she", "her", "hers", "girl", "girls", "mother", "daughter", "sister",
                   "wife", "lady", "ladies", "female", "actress", "queen"],
        "male": ["man", "men", "he", "him", "his", "boy", "boys", "father", "son", "brother", "husband",
                 "gentleman", "male", "actor", "king"]},
    "race/ethnicity": {
        "black": ["black", "blacks", "african"],
        "white": ["white", "whites", "caucasian"],
        "asian": ["asian", "asians"],
        "hispanic": ["hispanic", "latino", "latina", "latinos"],
        "arab": ["arab", "arabs"]},
    "religion": {
        "christian": ["christian", "christians", "christianity", "church"],
        "muslim": ["muslim", "muslims", "islam", "islamic", "mosque"],
        "jewish": ["jewish", "jew", "jews", "judaism", "synagogue"],
        "hindu": ["hindu", "hindus", "hinduism"],
        "buddhist": ["buddhist", "buddhists", "buddhism"],
        "atheist": ["atheist", "atheists", "atheism"]},
    "age": {
        "young": ["young", "youth", "teenager", "teenagers", "teen", "kid", "kids", "child", "children"],
        "old": ["old", "elderly", "senior", "seniors", "grandmother", "grandfather", "retired"]},
    "disability": {
        "disabled": ["disabled", "disability", "wheelchair", "blind", "deaf", "autistic", "handicapped"]},
    "nationality": {
        "american": ["american", "americans"], "mexican": ["mexican", "mexicans"],
        "chinese": ["chinese", "china"], "indian": ["indian", "indians", "india"],
        "british": ["british", "english", "britain"], "french": ["french", "france"],
        "german": ["german", "germans", "germany"], "russian": ["russian", "russians", "russia"]},
    "sexual orientation": {
        "gay or lesbian": ["gay", "gays", "lesbian", "lesbians", "homosexual", "bisexual", "queer"],
        "straight": ["heterosexual", "straight"]},
}
NO_ROWS = np.array([], int)
MIN_ROWS = 10  # fewer rows than this make an interval too wide to flag anything


@dataclass
class BiasScan:
    """What the rows say about groups. `groups` has a row per group; `terms` per term mentioned."""
    rows: int
    groups: pd.DataFrame
    terms: pd.DataFrame
    label: str = ""                        # the label whose share is compared ("" without labels)
    label_share: float = float("nan")      # its share over all rows
    confidence: float = 0.95               # of all the scan's intervals together
    notes: list[str] = field(default_factory=list)

    @property
    def has_shares(self) -> bool:
        """Whether some group has a label share to show (labelled rows that name it)."""
        return bool(self.label) and bool((self.groups["compared_rows"] > 0).any())

    @property
    def flagged(self) -> pd.DataFrame:
        return self.groups[self.groups["flagged"]] if "flagged" in self.groups else self.groups.iloc[:0]

    def headline(self) -> str:
        """One line: rows scanned, groups mentioned, and those that differ."""
        mentioned = int((self.groups["rows"] > 0).sum())
        line = f"bias scan of {self.rows:,} training rows: {mentioned} of {len(self.groups)} groups mentioned"
        if not self.label:
            return line
        differ = self.differences()
        return line + (f"; differ: {differ}" if differ else "; none differs beyond its interval")

    def differences(self) -> str:
        """The groups that differ, each with its share and its baseline's."""
        return "; ".join(f"{r.group} ({r.share:.0%} {self.label!r} against {r.baseline_share:.0%})"
                         for r in self.flagged.itertuples())

    def summary(self) -> str:
        lines = [self.headline()]
        for r in self.groups[self.groups["rows"] > 0].itertuples():
            line = f"   {r.axis} / {r.group}: {r.rows:,} row" + ("" if r.rows == 1 else "s")
            if self.label and r.compared_rows:
                peers = "" if np.isnan(r.peers_share) else f"{r.peers_share:.0%} in other {r.axis} groups' rows, "
                line += (f"; of the {r.compared_rows:,} naming no other {r.axis} group, {self.label!r} {r.share:.0%} "
                         f"[{r.low:.0%}, {r.high:.0%}] against {peers}{r.baseline_share:.0%} where none is named"
                         + ("  <- differs" if r.flagged else ""))
            lines.append(line)
        return "\n".join(lines + [f"   {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "label": self.label, "label_share": self.label_share,
                "confidence": self.confidence, "groups": self.groups.to_dict(orient="records"),
                "terms": self.terms.to_dict(orient="records"), "notes": self.notes}


def check_groups(groups: dict) -> dict[str, dict[str, list[str]]]:
    """The term lists, lower-cased; a one-line UserError for a list the scan cannot use."""
    if not isinstance(groups, dict) or not groups:
        raise UserError("the group term list is empty; give {axis: {group: [terms]}}, e.g. "
                        "{'gender': {'female': ['she', 'woman'], 'male': ['he', 'man']}}")
    checked: dict[str, dict[str, list[str]]] = {}
    for axis, named in groups.items():
        if not isinstance(named, dict) or not named:
            raise UserError(f"bias scan axis {axis!r}: give its groups, e.g. {{'female': ['she', 'woman']}}")
        checked[axis] = {}
        for group, terms in named.items():
            if not isinstance(terms, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in terms):
                raise UserError(f"bias scan group {axis}/{group}: write a list of words, e.g. ['she', 'woman']")
            odd = [t for t in terms if not re.fullmatch(r"[a-z]+", t.strip().lower())]
            if odd:  # rows are split into words of letters, so nothing else could match
                raise UserError(f"bias scan group {axis}/{group}: {odd[0]!r} is not a single word of letters")
            if len(terms) < 2:
                raise UserError(f"bias scan group {axis}/{group} needs two or more terms (plurals, related words) "
                                f"so that the scan does not hinge on one word; it has {len(terms)}")
            checked[axis][group] = [t.strip().lower() for t in terms]
    return checked


def scan(frame: pd.DataFrame, groups: dict | None = None, confidence: float = 0.95) -> BiasScan:
    """Scan a normalised frame (text or prompt+completion, and a label where classified);
    `groups` as DEFAULT_GROUPS, which are used where it is None."""
    groups = check_groups(DEFAULT_GROUPS if groups is None else groups)
    words = row_words(frame)
    hits = term_hits(words, groups)
    label, labels = outcome(frame)
    table = group_table(hits, groups, len(frame))
    terms = term_table(hits)
    notes = [] if label else ["no label column: mentions are counted, label shares need classification data"]
    result = BiasScan(len(frame), table, terms, label, float(np.mean(labels)) if label else float("nan"),
                      confidence, notes)
    if label:
        compare_shares(result, hits, labels)
    return result


def row_words(frame: pd.DataFrame) -> pd.Series:
    """Each row's lower-case words, one row per (row position, word)."""
    columns = [c for c in ("text", "prompt", "completion", "chosen", "rejected") if c in frame]
    if not columns:
        raise UserError("the bias scan needs a text column (text, or prompt and completion)")
    text = frame[columns].astype(str).agg(" ".join, axis=1).str.lower()
    found = text.str.findall(r"[a-z]+")
    words = found.explode()  # an empty list becomes one NaN, hence the clip
    words.index = np.repeat(np.arange(len(frame)), found.map(len).clip(lower=1).to_numpy())
    return words.dropna()


def term_hits(words: pd.Series, groups: dict) -> pd.DataFrame:
    """(row, axis, group, term) for every term a row mentions, once per row."""
    owner = pd.DataFrame([(axis, group, term) for axis, named in groups.items()
                          for group, terms in named.items() for term in terms], columns=["axis", "group", "term"])
    found = pd.DataFrame({"row": words.index, "term": words.to_numpy()})
    found = found[found["term"].isin(set(owner["term"]))].drop_duplicates()
    return found.merge(owner, on="term")


def outcome(frame: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The label compared across groups, and whether each row has it: the less common of two
    labels (the one a skew would show in), or for more classes the least common."""
    if "label" not in frame or frame["label"].nunique() < 2:
        return "", np.zeros(len(frame), bool)
    label = str(frame["label"].value_counts().index[-1])
    return label, (frame["label"].astype(str) == label).to_numpy()


def group_table(hits: pd.DataFrame, groups: dict, total: int) -> pd.DataFrame:
    """Rows mentioning each group, and their share of all rows."""
    counts = hits.drop_duplicates(["row", "axis", "group"]).groupby(["axis", "group"]).size()
    rows = [(axis, group, int(counts.get((axis, group), 0))) for axis, named in groups.items() for group in named]
    table = pd.DataFrame(rows, columns=["axis", "group", "rows"])
    table["mentioned in"] = table["rows"] / max(total, 1)
    return table


def term_table(hits: pd.DataFrame) -> pd.DataFrame:
    counts = hits.groupby(["axis", "group", "term"]).size().rename("rows").reset_index()
    return counts.sort_values("rows", ascending=False, ignore_index=True)


def compare_shares(result: BiasScan, hits: pd.DataFrame, labels: np.ndarray) -> None:
    """Each group's label share against two references: the rows that name no group of its
    axis (the baseline), and the rows of the axis' other groups (its peers). A group is flagged
    where both differences' intervals exclude 0 in the same direction: it stands out from the
    data and from its peers, so the group that was skewed is flagged, not the peers it is
    compared with, and once counterfactual copies even the groups out, none is.

    A group's share counts only the rows that name it and no other group of its axis ("she
    told him" counts for neither), so that one group's skew does not show in another's."""
    only = exclusive_hits(hits)
    tested = sum(int((only.groupby(keys)["row"].nunique() >= MIN_ROWS).sum()) for keys in (["axis", "group"],
                                                                                        ["axis", "term"]))
    z = NormalDist().inv_cdf(1 - (1 - result.confidence) / (2 * 2 * max(tested, 1)))
    neutral = {axis: np.setdiff1d(np.arange(len(labels)), part["row"].unique()) for axis, part in hits.groupby("axis")}
    rows_of = only.groupby(["axis", "group"])["row"].unique()
    figures = []
    for axis, group in result.groups[["axis", "group"]].itertuples(index=False):
        rows = rows_of.get((axis, group), NO_ROWS)
        peers = [r for (a, g), r in rows_of.items() if a == axis and g != group]
        figures.append(group_figures(rows, neutral.get(axis, NO_ROWS),
                                     np.concatenate(peers) if peers else NO_ROWS, labels, z))
    result.groups = pd.concat([result.groups, pd.DataFrame(figures)], axis=1)
    result.terms = term_shares(result.terms, only, neutral, labels, z)


def exclusive_hits(hits: pd.DataFrame) -> pd.DataFrame:
    """The hits of rows that name a single group of the axis."""
    groups_per_row = hits.groupby(["axis", "row"])["group"].transform("nunique")
    return hits[groups_per_row == 1]


def group_figures(rows: np.ndarray, baseline: np.ndarray, peers: np.ndarray, labels: np.ndarray, z: float) -> dict:
    base = difference(rows, baseline, labels, z)
    peer = difference(rows, peers, labels, z)
    same_way = np.sign(base["difference"]) == np.sign(peer["difference"])
    # A group alone on its axis (no peers named) is compared with the baseline only.
    flagged = apart(base) and (apart(peer) and same_way if len(peers) else True)
    return {"compared_rows": len(rows), "share": base["share"], "low": base["share_low"], "high": base["share_high"],
            "baseline_share": base["other"], "difference": base["difference"], "difference_low": base["low"],
            "difference_high": base["high"], "peers_share": peer["other"], "peers_difference": peer["difference"],
            "peers_difference_low": peer["low"], "peers_difference_high": peer["high"], "tested": base["enough"],
            "flagged": bool(flagged)}


def term_shares(terms: pd.DataFrame, only: pd.DataFrame, neutral: dict, labels: np.ndarray, z: float) -> pd.DataFrame:
    """Each term's label share against its axis' baseline, the most skewed first: by how far
    the difference's interval lies from 0 (negative where it spans 0)."""
    rows_of = only.groupby(["axis", "term"])["row"].unique()
    found = []
    for axis, term in terms[["axis", "term"]].itertuples(index=False):
        rows = rows_of.get((axis, term), NO_ROWS)
        d = difference(rows, neutral.get(axis, NO_ROWS), labels, z)
        found.append({"compared_rows": len(rows), "share": d["share"], "baseline_share": d["other"],
                      "difference_low": d["low"], "difference_high": d["high"], "flagged": apart(d)})
    terms = pd.concat([terms.reset_index(drop=True), pd.DataFrame(found)], axis=1)
    terms["skew"] = np.maximum(terms["difference_low"], -terms["difference_high"])
    return terms.sort_values(["skew", "rows"], ascending=False, ignore_index=True).drop(columns="skew")


def difference(rows: np.ndarray, other: np.ndarray, labels: np.ndarray, z: float) -> dict:
    """The label share of `rows` (with its Wilson interval), of `other`, and their difference
    with Newcombe's interval; `enough` where both have MIN_ROWS rows."""
    share, low, high = wilson(int(labels[rows].sum()), len(rows), z)
    base, base_low, base_high = wilson(int(labels[other].sum()), len(other), z)
    diff = share - base
    return {"share": share, "share_low": low, "share_high": high, "other": base, "difference": diff,
            "low": diff - np.hypot(share - low, base_high - base), "high": diff + np.hypot(high - share, base - base_low),
            "enough": len(rows) >= MIN_ROWS and len(other) >= MIN_ROWS}


def apart(d: dict) -> bool:
    """Whether a difference's interval excludes 0, with enough rows on both sides."""
    return bool(d["enough"] and (d["low"] > 0 or d["high"] < 0))


def wilson(k: int, n: int, z: float) -> tuple[float, float, float]:
    """The share k/n and its Wilson score interval; NaN for no rows."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p; rounding alone could put a bound a hair past it (or past 0 or 1).
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
