"""The data report: every check worth knowing before training, with a severity each."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..errors import UserError
from .bias_scan import BiasScan
from .columns import duplicated
from .pairs import check_pairs


@dataclass
class DataReport:
    """What was found in the data. `checks` has one row per check with a severity."""
    checks: pd.DataFrame
    class_balance: pd.Series | None = None
    token_lengths: pd.Series | None = None
    max_length: int | None = None  # the train.max_length the token lengths were cut to
    split_sizes: dict = field(default_factory=dict)
    bias_scan: BiasScan | None = None            # the training rows as split
    bias_scan_mitigated: BiasScan | None = None  # after counterfactual copies or reweighting
    pair_lengths: pd.DataFrame | None = None  # preference pairs: each answer's length in characters

    def add(self, check: str, count: int, total: int, severity: str, detail: str) -> None:
        row = {"check": check, "count": int(count), "share": (count / total) if total else 0.0,
               "severity": severity, "detail": detail}
        self.checks = pd.concat([self.checks, pd.DataFrame([row])], ignore_index=True)

    @property
    def warnings(self) -> pd.DataFrame:
        return self.checks[self.checks["severity"] != "ok"]

    def summary(self) -> str:
        lines = []
        for r in self.checks.itertuples():
            mark = {"ok": " ", "warning": "!", "error": "x"}[r.severity]
            lines.append(f" {mark} {r.check}: {r.count:,} ({r.share:.0%}) {r.detail}".rstrip())
        if self.token_lengths is not None and len(self.token_lengths):
            q = self.token_lengths.quantile([0.5, 0.95])
            lines.append(f"   token lengths: median {q[0.5]:.0f}, 95th percentile {q[0.95]:.0f}, "
                         f"max {self.token_lengths.max()}")
        if self.split_sizes:
            lines.append("   split: " + ", ".join(f"{k} {v:,}" for k, v in self.split_sizes.items()))
        for heading, found in (("", self.bias_scan), ("after mitigation, ", self.bias_scan_mitigated)):
            if found is not None:
                lines.append("   " + heading + found.summary())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from ..render import html
        return html.data_report(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())

    def to_dict(self) -> dict:
        return {"checks": self.checks.to_dict(orient="records"),
                "class_balance": None if self.class_balance is None else self.class_balance.to_dict(),
                "token_lengths": None if self.token_lengths is None else
                self.token_lengths.describe().round(1).to_dict(),
                "split_sizes": self.split_sizes,
                "bias_scan": None if self.bias_scan is None else self.bias_scan.to_dict(),
                "bias_scan_mitigated": None if self.bias_scan_mitigated is None else
                self.bias_scan_mitigated.to_dict(),
                "chosen_longer": None if self.pair_lengths is None else
                float((self.pair_lengths["chosen"] > self.pair_lengths["rejected"]).mean())}


def build_report(raw: pd.DataFrame, frame: pd.DataFrame, task: str) -> DataReport:
    """Check a normalised frame; raises UserError for data that cannot be trained on at all."""
    n = len(frame)
    report = DataReport(pd.DataFrame(columns=["check", "count", "share", "severity", "detail"]))
    if n == 0:
        raise UserError("the data set has no rows; give a file with at least two rows")
    _check_source(report, raw, n)
    _check_empty(report, frame)
    dup = int(duplicated(frame).sum())
    report.add("exact duplicates", dup, n, "warning" if dup else "ok", "")
    if task == "classification":
        _check_labels(report, frame)
    if task == "preference":
        check_pairs(report, frame)
    return report


def add_token_checks(report: DataReport, stats: dict, limit: int) -> None:
    """The tokenizer's checks (prompts and responses cut at `limit`, rows left with no trained
    token), and the training rows' token lengths; `stats`: each split's TokenizationStats."""
    train = stats["train"]
    report.token_lengths = pd.Series(train.lengths, name="tokens")
    report.max_length = limit
    n = train.rows
    report.add(f"prompts cut to max_length {limit}", train.prompt_truncated, n,
               "warning" if train.prompt_truncated > n / 4 else "ok",
               "middle of the prompt removed" if train.prompt_truncated else "")
    report.add("responses cut", train.response_truncated, n, "warning" if train.response_truncated else "ok",
               "raise train.max_length" if train.response_truncated else "")
    dropped = sum(s.dropped_no_trained for s in stats.values())
    report.add("rows dropped: no trained token left", dropped, n, "error" if dropped else "ok",
               "raise train.max_length" if dropped else "")


def add_bias_scan(report: DataReport, found: BiasScan) -> None:
    """The scan as one check: the groups whose label share differs from the rows that name
    no group of its axis."""
    report.bias_scan = found
    mentioned = int((found.groups["rows"] > 0).sum())
    flagged = found.flagged
    detail = found.differences(flagged)
    if len(flagged):
        detail += " (data.counterfactual or data.reweight_groups can even this out)"
    if len(found.possible):
        detail = "; ".join(filter(None, [detail, "possible (beyond one comparison's interval, not the scan's): "
                                         + found.differences(found.possible)]))
    elif not found.label:
        detail = f"{mentioned} groups mentioned; no labels to compare"
    report.add("bias scan: groups whose label share differs", len(flagged), max(mentioned, 1),
               "warning" if len(flagged) else "ok", detail)


def _check_source(report: DataReport, raw: pd.DataFrame, n: int) -> None:
    """The row count with the source's columns, and the lines skipped as unreadable."""
    names = [str(c) for c in raw.columns]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    report.add("rows", n, n, "ok", f"source columns: {shown}")
    skipped = raw.attrs.get("skipped_lines", 0)
    if skipped:
        report.add("unreadable lines skipped", skipped, n + skipped, "warning", "data.skip_bad_lines is on")


def _check_empty(report: DataReport, frame: pd.DataFrame) -> None:
    """Empty cells per standard column; a column empty in every row is an error."""
    n = len(frame)
    for col in [c for c in ("text", "prompt", "completion", "label") if c in frame]:
        empty = int((frame[col].str.strip() == "").sum())
        if empty == n:
            raise UserError(f"the {col} column is empty in every row; point data.{col}_column at the "
                            "column that holds it")
        report.add(f"empty {col}", empty, n, "warning" if empty else "ok",
                   "rows dropped" if empty else "")


def _check_labels(report: DataReport, frame: pd.DataFrame) -> None:
    """Texts with conflicting labels, and the class balance (a single class is an error)."""
    n = len(frame)
    per_text = frame.groupby("text")["label"].nunique()
    conflicts = int(per_text[per_text > 1].size)
    report.add("same text, conflicting labels", conflicts, n, "warning" if conflicts else "ok",
               "texts" if conflicts else "")
    balance = frame["label"].value_counts()
    if balance.size < 2:
        raise UserError(f"the label column has a single class ({balance.index[0]!r}); classification "
                        "needs two or more classes: check data.label_column")
    report.class_balance = balance
    ratio = balance.max() / balance.min()
    report.add("classes", balance.size, balance.size, "warning" if ratio > 3 else "ok",
               ", ".join(f"{k}: {v}" for k, v in balance.items()))
