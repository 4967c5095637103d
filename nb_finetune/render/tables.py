"""HTML tables: a DataFrame as a small escaped table, the data report, a row's tokens."""
from __future__ import annotations

import html
import math

import pandas as pd

from ..redact import redact
from .figures import ROLE_COLORS

TABLE_STYLE = ("<style>.nbft-table{border-collapse:collapse;font-size:12px}"
                ".nbft-table td,.nbft-table th{border:1px solid #ddd;padding:2px 6px;text-align:left;"
                "vertical-align:top;max-width:28em}"
                ".nbft-warning{background:#fff3cd}.nbft-error{background:#f8d7da}</style>")


def shorten(text: str, n: int = 160) -> str:
    """`text` on one line in about `n` characters: its start and its end around an ellipsis
    (the middle is the least useful part), each cut between words (inside one only where a
    single word is that long)."""
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    room = n - 3  # for " … "
    head_end, tail_start = room * 2 // 3, len(text) - room // 3
    if text[head_end] != " " and " " in text[:head_end]:
        head_end = text.rindex(" ", 0, head_end)
    if text[tail_start - 1] != " ":  # the end from its next word on (none: the start alone)
        tail_start = text.index(" ", tail_start) + 1 if " " in text[tail_start:] else len(text)
    return f"{text[:head_end].rstrip()} \u2026 {text[tail_start:].lstrip()}".rstrip()


def _cell(value) -> str:
    if isinstance(value, float):
        text = "" if math.isnan(value) else f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
        if len(text) > 300:  # a long review would stretch the table
            text = shorten(text, 300)
    return html.escape(redact(text))


def table_html(frame: pd.DataFrame, index: bool = False, row_class: pd.Series | None = None) -> str:
    """A DataFrame as a small escaped HTML table; `row_class` gives a CSS class per row."""
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for i, (key, row) in enumerate(frame.iterrows()):
        cells = ([_cell(key)] if index else []) + [_cell(v) for v in row]
        cls = f' class="nbft-{row_class.iloc[i]}"' if row_class is not None else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'{TABLE_STYLE}<table class="nbft-table"><tr>{head}</tr>{"".join(rows)}</table>'


def interval_cells(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A table whose columns are (model, statistic) with (model, statistic_low/_high) beside
    them, as one column per (model, statistic) reading "value [low, high]"."""
    def number(column):
        return frame[column].map(f"{{:.{digits}f}}".format)

    out = {}
    for model, stat in frame.columns:
        if stat.endswith(("_low", "_high")):
            continue
        cells = number((model, stat))
        if (model, f"{stat}_low") in frame:
            cells = cells + " [" + number((model, f"{stat}_low")) + ", " + number((model, f"{stat}_high")) + "]"
        out[f"{model} {stat.replace('_', ' ')}"] = cells  # spaces let a narrow header wrap
    return pd.DataFrame(out)


def report_html(checks: pd.DataFrame) -> str:
    """The data report, warnings in yellow and errors in red."""
    shown = checks.assign(share=checks["share"].map(lambda s: f"{s:.0%}"))
    return table_html(shown, row_class=checks["severity"].where(checks["severity"] != "ok", "ok"))


def tokens_html(tokens: pd.DataFrame, legend: bool = True) -> str:
    """Tokens as coloured chips by role, each with its id and label under it (-100: not trained)."""
    chips = []
    for r in tokens.itertuples():
        text = html.escape(redact(r.token)).replace(" ", "&middot;").replace("\n", "&#8629;") or "&nbsp;"
        label = "" if r.label == -100 else f"<br><span style='color:#1b4332'>&rarr;{r.label}</span>"
        chips.append(f"<span title='{r.role}' style='display:inline-block;margin:1px;padding:1px 3px;"
                     f"border-radius:3px;background:{ROLE_COLORS[r.role]};font-family:monospace;"
                     f"font-size:11px;text-align:center'>{text}<br><span style='color:#666'>{r.id}</span>"
                     f"{label}</span>")
    key = role_legend() + "<br><br>" if legend else ""
    return f"<div style='line-height:1.1'>{key}{''.join(chips)}</div>"


def role_legend() -> str:
    return " ".join(f"<span style='background:{c};padding:1px 6px;border-radius:3px'>{k}"
                    f"{' (trained)' if k == 'response' else ''}</span>" for k, c in ROLE_COLORS.items())


def pair_tokens_html(prompt: pd.DataFrame, chosen: pd.DataFrame, rejected: pd.DataFrame) -> str:
    """One preference pair's tokens: the prompt both answers share, once, then the chosen and the
    rejected answer side by side, each as `tokens_html` chips."""
    sides = "".join(f"<div style='flex:1;min-width:0;border:1px solid #ddd;border-radius:4px;padding:4px'>"
                    f"<b>{name}</b> ({int((side['role'] == 'response').sum())} trained tokens)<br>"
                    f"{tokens_html(side, legend=False)}</div>" for name, side in (("chosen", chosen),
                                                                                  ("rejected", rejected)))
    return (f"<div style='line-height:1.1'>{role_legend()}</div><div style='margin:6px 0'><b>shared prompt</b> "
            f"({len(prompt)} tokens, not trained)<br>{tokens_html(prompt, legend=False)}</div>"
            f"<div style='display:flex;gap:8px;align-items:flex-start'>{sides}</div>")


def preference_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """evaluation.preference's metrics table for reading: per model the pairs, the preference
    accuracy and the mean margin each as "value [low, high]", and the tuned model's reward accuracy."""
    def with_interval(stat, low, high, digits):
        return [f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                for v, lo, hi in zip(metrics[stat], metrics[low], metrics[high])]

    out = pd.DataFrame({"pairs": metrics["pairs"].astype(int).values,
                        "preference accuracy [95% interval]": with_interval("preference_accuracy", "accuracy_low",
                                                                            "accuracy_high", 3),
                        "mean margin [95% interval]": with_interval("mean_margin", "margin_low", "margin_high", 2)},
                       index=metrics.index)
    if "reward_accuracy" in metrics:
        out["reward accuracy (against base)"] = metrics["reward_accuracy"].map(
            lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return out
