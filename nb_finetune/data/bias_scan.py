"""A scan of training rows for what they could teach about groups, before any training:
how often each group is mentioned, and, for labelled data, whether the rows that mention a
group carry a label more or less often than the rows that name no group of its axis (the
baseline), with intervals.

A row mentions a group when it contains one of the group's terms as a whole word. A group is
flagged when the interval of a difference between its label share and the baseline's
excludes 0: of the rows naming it alone (Wilson and Newcombe intervals), or of all rows naming
it, adjusted for the other groups of its axis named beside it (Mantel-Haenszel). The intervals
are widened together (Bonferroni) so that the chance of any false flag in one scan stays near
5%; a difference beyond one comparison's own interval only is reported as possible.
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

    @property
    def possible(self) -> pd.DataFrame:
        """Groups one comparison finds different at its own confidence, not at the scan's: too few
        rows, or too many comparisons, to be sure."""
        return self.groups[self.groups["possible"]] if "possible" in self.groups else self.groups.iloc[:0]

    def headline(self) -> str:
        """One line: rows scanned, groups mentioned, and those that differ or may."""
        mentioned = int((self.groups["rows"] > 0).sum())
        line = f"bias scan of {self.rows:,} training rows: {mentioned} of {len(self.groups)} groups mentioned"
        if not self.label:
            return line
        differ, maybe = self.differences(self.flagged), self.differences(self.possible)
        return (line + (f"; differ: {differ}" if differ else "; none differs beyond its interval")
                + (f"; possible (beyond one comparison's interval, not the scan's): {maybe}" if maybe else ""))

    def differences(self, groups: pd.DataFrame) -> str:
        """Each group with the share of the rows naming it (all of them, other groups named or
        not) and the share where no group of its axis is named."""
        return "; ".join(f"{r.group} ({r.mention_share:.0%} {self.label!r} in its {r.rows:,} rows against "
                         f"{r.baseline_share:.0%})" for r in groups.itertuples())

    def summary(self) -> str:
        lines = [self.headline()]
        for r in self.groups[self.groups["rows"] > 0].itertuples():
            line = f"   {r.axis} / {r.group}: {r.rows:,} row" + ("" if r.rows == 1 else "s")
            if self.label and r.compared_rows:
                peers = "" if np.isnan(r.peers_share) else f"{r.peers_share:.0%} in other {r.axis} groups' rows, "
                line += (f"; of the {r.compared_rows:,} naming no other {r.axis} group, {self.label!r} {r.share:.0%} "
                         f"[{r.low:.0%}, {r.high:.0%}] against {peers}{r.baseline_share:.0%} where none is named")
            if self.label and r.adjusted_tested:
                line += (f"; all its rows {r.mention_share:.0%}, {r.adjusted_difference:+.0%} "
                         f"[{r.adjusted_low:+.0%}, {r.adjusted_high:+.0%}] against rows naming the same other groups")
            if self.label and (r.flagged or r.possible):
                line += "  <- differs" if r.flagged else "  <- possible"
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
    """Each group's label share, compared two ways; a group is flagged where either finds a
    difference, and called possible where one finds it at its own confidence only.

    Alone: the rows that name the group and no other of its axis ("she told him" counts for
    neither) against the rows that name no group of the axis (the baseline) and against the rows
    of the axis' other groups (its peers), both differences' intervals excluding 0 in the same
    direction. So the group that was skewed is flagged, not the peers it is compared with, and
    once counterfactual copies even the groups out, none is.

    Adjusted: every row that names the group against the rows that do not, within strata of the
    other groups of its axis named (Mantel-Haenszel). In long texts most rows that name one group
    name another; this keeps them, and still tells the skewed group from those named beside it."""
    only = exclusive_hits(hits)
    strata = axis_strata(hits, len(labels))
    tested = sum(int((only.groupby(keys)["row"].nunique() >= MIN_ROWS).sum()) for keys in (["axis", "group"],
                                                                                        ["axis", "term"]))
    tested += int((hits.groupby(["axis", "group"])["row"].nunique() >= MIN_ROWS).sum())
    z = NormalDist().inv_cdf(1 - (1 - result.confidence) / (2 * 2 * max(tested, 1)))
    z_one = NormalDist().inv_cdf(1 - (1 - result.confidence) / 2)  # one comparison on its own
    neutral = {axis: np.setdiff1d(np.arange(len(labels)), part["row"].unique()) for axis, part in hits.groupby("axis")}
    rows_of = only.groupby(["axis", "group"])["row"].unique()
    figures = []
    for axis, group in result.groups[["axis", "group"]].itertuples(index=False):
        rows = rows_of.get((axis, group), NO_ROWS)
        peers = [r for (a, g), r in rows_of.items() if a == axis and g != group]
        alone = {zz: group_figures(rows, neutral.get(axis, NO_ROWS), np.concatenate(peers) if peers else NO_ROWS,
                                   labels, zz) for zz in (z, z_one)}
        adjusted = adjusted_difference(strata[axis], group, labels) if axis in strata else UNTESTED
        figures.append(verdict(alone, adjusted, z, z_one))
    result.groups = pd.concat([result.groups, pd.DataFrame(figures)], axis=1)
    result.terms = term_shares(result.terms, only, neutral, labels, z)


def verdict(alone: dict, adjusted: dict, z: float, z_one: float) -> dict:
    """A group's figures at the scan's confidence, flagged by either comparison, and `possible`
    where one excludes 0 at the confidence of a single comparison only (few rows, or many tests)."""
    diff, half = adjusted["difference"], z * adjusted["se"]
    # Where most of a group's rows name another group of its axis too, its rows alone are too few
    # and too unusual to stand for it: all its rows decide. Elsewhere the rows alone, with the
    # peers' check, do (short texts: a lone strong word is not a skew of its group).
    shared = alone[z]["compared_rows"] < adjusted["rows"] / 2
    flagged = alone[z]["flagged"] or (shared and excludes_zero(adjusted, z))
    possible = not flagged and (alone[z_one]["flagged"] or (shared and excludes_zero(adjusted, z_one)))
    return alone[z] | {"mention_share": adjusted["mention_share"], "adjusted_difference": diff,
                       "adjusted_low": diff - half, "adjusted_high": diff + half,
                       "adjusted_tested": adjusted["tested"], "flagged": bool(flagged), "possible": bool(possible)}


UNTESTED = {"rows": 0, "mention_share": float("nan"), "difference": float("nan"), "se": float("nan"), "tested": False}


def excludes_zero(adjusted: dict, z: float) -> bool:
    return bool(adjusted["tested"] and abs(adjusted["difference"]) > z * adjusted["se"])


def axis_strata(hits: pd.DataFrame, total: int) -> dict[str, pd.DataFrame]:
    """Per axis, a row per data row: which of the axis' groups it names (True/False columns)."""
    named = hits.drop_duplicates(["row", "axis", "group"]).assign(named=True)
    return {axis: part.pivot(index="row", columns="group", values="named").reindex(range(total)).notna()
            for axis, part in named.groupby("axis")}


def adjusted_difference(named: pd.DataFrame, group: str, labels: np.ndarray) -> dict:
    """The label share of every row naming `group`, and its difference from rows not naming it
    with the same other groups of the axis named: the Mantel-Haenszel risk difference over
    those strata, and its standard error by Sato's variance (sound for many small strata as
    for few large ones). Tested where MIN_ROWS rows on each side share a stratum."""
    if group not in named:
        return UNTESTED
    mentions = named[group].to_numpy()
    _, stratum = np.unique(named.drop(columns=group).to_numpy(), axis=0, return_inverse=True)
    cells = pd.DataFrame({"stratum": stratum.ravel(), "mention": mentions, "label": labels.astype(int)})
    table = cells.groupby(["stratum", "mention"])["label"].agg(["sum", "count"]).unstack("mention", fill_value=0)
    a1, n1 = (table.get((k, True), pd.Series(0, index=table.index)).astype(float) for k in ("sum", "count"))
    a0, n0 = (table.get((k, False), pd.Series(0, index=table.index)).astype(float) for k in ("sum", "count"))
    n, weight = n1 + n0, float((n1 * n0 / (n1 + n0)).sum())
    share = float(labels[mentions].mean()) if mentions.any() else float("nan")
    if weight == 0:
        return UNTESTED | {"rows": int(mentions.sum()), "mention_share": share}
    diff = float(((a1 * n0 - a0 * n1) / n).sum() / weight)
    p = ((n1 ** 2 * a0 - n0 ** 2 * a1 + n1 * n0 * (n0 - n1) / 2) / n ** 2).sum()
    q = ((a1 * (n0 - a0) + a0 * (n1 - a1)) / (2 * n)).sum()
    both = (n1 > 0) & (n0 > 0)  # strata where the group's rows meet rows without it
    se = float(np.sqrt(max(diff * p + q, 0.0)) / weight)
    return {"rows": int(mentions.sum()), "mention_share": share, "difference": diff, "se": se,
            "tested": bool(min(n1[both].sum(), n0[both].sum()) >= MIN_ROWS)}


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
    columns = ["compared_rows", "share", "baseline_share", "difference_low", "difference_high", "flagged"]
    terms = pd.concat([terms.reset_index(drop=True), pd.DataFrame(found, columns=columns)], axis=1)
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
