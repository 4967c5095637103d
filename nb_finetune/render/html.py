"""Rich display of the engine's objects: what the last line of a cell shows.

Each object a user holds (a config, a data report, a training result, an evaluation result, a
session) gets `_repr_html_` (a readable table, pictures inlined as PNG) and `_repr_pretty_`
(plain text for terminals and logs) from the functions here. Pure functions of what they are
given; no widgets, and nothing here imports the stages.
"""
from __future__ import annotations

import base64
import dataclasses
import html

import pandas as pd

from ..redact import redact
from . import figures
from .tables import TABLE_STYLE, preference_metrics, report_html, table_html


def image(fig) -> str:
    data = base64.b64encode(figures.to_png(fig)).decode()
    return f"<img src='data:image/png;base64,{data}'/>"


def title(text: str) -> str:
    return f"<div style='font-weight:bold;margin:6px 0 2px'>{html.escape(text)}</div>"


def config_table(cfg) -> str:
    """One table per section of a RunConfig; each field's help text is its tooltip."""
    parts = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        rows = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            changed = value != f.default if f.default is not dataclasses.MISSING else bool(value)
            style = " style='font-weight:bold'" if changed else ""
            rows.append(f"<tr><td title='{html.escape(f.metadata.get('help', ''), quote=True)}'>{f.name}</td>"
                        f"<td{style}>{html.escape(redact(repr(value)))}</td></tr>")
        parts.append(f"<td style='vertical-align:top'>{title(section.name)}<table class='nbft-table'>"
                     f"{''.join(rows)}</table></td>")
    return (TABLE_STYLE + "<div>RunConfig (settings that differ from the defaults in bold; hover a "
            f"name for its help)</div><table><tr>{''.join(parts)}</tr></table>")


def data_report(report) -> str:
    out = [title("data report"), report_html(report.checks)]
    if report.class_balance is not None:
        out.append(image(figures.class_balance_figure(report.class_balance)))
    if report.pair_lengths is not None:
        out.append(image(figures.pair_lengths_figure(report.pair_lengths)))
    if report.token_lengths is not None and len(report.token_lengths):
        out.append(image(figures.token_length_figure(report.token_lengths, report.max_length)))
    if report.split_sizes:
        out.append("<div>split: " + ", ".join(f"{k} {v:,}" for k, v in report.split_sizes.items()) + "</div>")
    for heading, found in (("bias scan of the training rows", report.bias_scan),
                           ("bias scan after mitigation", report.bias_scan_mitigated)):
        if found is not None:
            out.append(bias_scan(found, heading))
    return "".join(out)


def bias_scan(found, heading: str) -> str:
    """The groups mentioned, each one's label share with its interval, and the most skewed terms."""
    out = [title(heading), f"<div>{html.escape(found.headline())}</div>"]
    if found.has_shares:
        out.append(image(figures.bias_scan_figure(found)))
    out.append(bias_scan_tables(found))
    return "".join(out)


def bias_scan_tables(found) -> str:
    """The most skewed terms (labelled data) or the groups mentioned, and the scan's notes."""
    if found.label:
        terms = found.terms[found.terms["rows"] >= 3].head(8)
        shown = terms[["axis", "group", "term", "rows", "compared_rows", "share", "baseline_share"]].rename(
            columns={"compared_rows": "compared rows", "share": f"{found.label} share",
                     "baseline_share": "where the axis is not named"})
        out = ["<div>most skewed terms</div>" + table_html(
            shown, row_class=terms["flagged"].map({True: "warning", False: "ok"}))] if len(terms) else []
    else:
        mentioned = found.groups[found.groups["rows"] > 0]
        out = [table_html(mentioned[["axis", "group", "rows", "mentioned in"]])] if len(mentioned) else []
    return "".join(out + [f"<div>{html.escape(n)}</div>" for n in found.notes])


def history(frame: pd.DataFrame, diagnosis: str, heading: str = "") -> str:
    draw = figures.preference_history_figure if "reward_margin" in frame else figures.history_figure
    return (image(draw(frame, heading)) + f"<div><b>diagnosis</b>: "
            f"{html.escape(diagnosis)}</div>" + table_html(frame.tail(5)))


def ending(result) -> str:
    how = "stopped" if result.stopped else "early-stopped" if result.early_stopped else "finished"
    return f"training {how} at step {result.global_step} in {result.seconds:.0f} s; adapter "


def train_result(result, diagnosis: str) -> str:
    head = ending(result) + f"<code>{html.escape(str(result.adapter_dir))}</code>"
    return TABLE_STYLE + f"<div>{head}</div>" + history(result.history, diagnosis)


def train_result_text(result, diagnosis: str) -> str:
    return f"{ending(result)}{result.adapter_dir}\n{diagnosis}\n{result.history.tail(5).to_string(index=False)}"


def instruction(text: str) -> str:
    """The instruction before every text of the tables that follow, said once instead of in each row."""
    return (f"<div style='color:#444;margin:4px 0'>each text below followed the instruction "
            f"<i>{html.escape(redact(text))}</i></div>") if text else ""


def evaluation(result) -> str:
    pairs = "preference_accuracy" in result.metrics
    shown = preference_metrics(result.metrics) if pairs else result.metrics
    out = [title("test metrics"), table_html(shown, index=True)]
    if pairs and "base_margin" in result.predictions:
        out.append(image(figures.pair_margins_figure(result.predictions)))
    if result.confusion is not None:
        out.append(image(figures.confusion_figure(result.confusion)))
    if len(result.errors) or len(result.samples):
        out.append(instruction(result.instruction))
    if len(result.errors):
        out += [title("worst errors"), table_html(result.errors)]
    if len(result.samples):
        out += [title("samples: base and tuned side by side"), table_html(result.samples)]
    return "".join(out)


def session(heading: str, stages: list[tuple[str, bool]], latest: str) -> str:
    """A session's stages, each marked done or not, and the latest result's own view."""
    marks = " &rarr; ".join(f"{'&#10003;' if ok else '&#9675;'} {name}" for name, ok in stages)
    return TABLE_STYLE + f"<div><b>Session</b> ({html.escape(heading)}): {marks}</div>" + latest
