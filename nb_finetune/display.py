"""Rich display for the engine's objects: what the last line of a cell shows.

Each object that a user holds (a config, a data report, a training result, an evaluation
result, a session) gets `_repr_html_` (a readable table, pictures inlined as PNG) and
`_repr_pretty_` (plain text for terminals and logs) from the functions here. No widgets.
"""
from __future__ import annotations

import base64
import dataclasses
import html

import pandas as pd

from . import plots
from .redact import redact


def _img(fig) -> str:
    data = base64.b64encode(plots.to_png(fig)).decode()
    return f"<img src='data:image/png;base64,{data}'/>"


def _title(text: str) -> str:
    return f"<div style='font-weight:bold;margin:6px 0 2px'>{html.escape(text)}</div>"


def config_html(cfg) -> str:
    """One table per section; each field's help text is its tooltip."""
    parts = []
    for section in ("data", "model", "train", "eval"):
        obj = getattr(cfg, section)
        rows = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            changed = value != f.default if f.default is not dataclasses.MISSING else bool(value)
            style = " style='font-weight:bold'" if changed else ""
            rows.append(f"<tr><td title='{html.escape(f.metadata.get('help', ''), quote=True)}'>{f.name}</td>"
                        f"<td{style}>{html.escape(redact(repr(value)))}</td></tr>")
        parts.append(f"<td style='vertical-align:top'>{_title(section)}<table class='nbft-table'>"
                     f"{''.join(rows)}</table></td>")
    return (plots._TABLE_STYLE + "<div>RunConfig (settings that differ from the defaults in bold; hover a "
            f"name for its help)</div><table><tr>{''.join(parts)}</tr></table>")


def report_html(report) -> str:
    out = [_title("data report"), plots.report_html(report.checks)]
    figures = []
    if report.class_balance is not None:
        figures.append(_img(plots.class_balance_figure(report.class_balance)))
    if report.token_lengths is not None and len(report.token_lengths):
        figures.append(_img(plots.token_length_figure(report.token_lengths, report.max_length)))
    out += figures
    if report.split_sizes:
        out.append("<div>split: " + ", ".join(f"{k} {v:,}" for k, v in report.split_sizes.items()) + "</div>")
    return "".join(out)


def history_html(history: pd.DataFrame, title: str = "") -> str:
    from .engine import diagnose
    return (_img(plots.history_figure(history, title)) + f"<div><b>diagnosis</b>: "
            f"{html.escape(diagnose(history))}</div>" + plots.table_html(history.tail(5)))


def _ending(result) -> str:
    how = "stopped" if result.stopped else "early-stopped" if result.early_stopped else "finished"
    return f"training {how} at step {result.global_step} in {result.seconds:.0f} s; adapter "


def train_result_html(result) -> str:
    head = _ending(result) + f"<code>{html.escape(str(result.adapter_dir))}</code>"
    return plots._TABLE_STYLE + f"<div>{head}</div>" + history_html(result.history)


def train_result_text(result) -> str:
    from .engine import diagnose
    return (f"{_ending(result)}{result.adapter_dir}\n"
            f"{diagnose(result.history)}\n{result.history.tail(5).to_string(index=False)}")


def eval_html(result) -> str:
    out = [_title("test metrics"), plots.table_html(result.metrics, index=True)]
    if result.confusion is not None:
        out.append(_img(plots.confusion_figure(result.confusion)))
    if len(result.errors):
        out += [_title("worst errors"), plots.table_html(result.errors)]
    if len(result.samples):
        out += [_title("samples: base and tuned side by side"), plots.table_html(result.samples)]
    return "".join(out)


def _stages(session) -> list[tuple[str, bool]]:
    """Each stage of the job and whether the session has its result."""
    return [("data", session.prep is not None), ("tokens", bool(session.token_stats)),
            ("model", session.model is not None), ("training", session.train_result is not None),
            ("evaluation", session.eval_result is not None)]


def session_html(session) -> str:
    marks = " &rarr; ".join(f"{'&#10003;' if ok else '&#9675;'} {name}" for name, ok in _stages(session))
    parts = [f"<div><b>Session</b> ({html.escape(session.cfg.model.name)} on "
             f"{html.escape(str(session.cfg.data.source))}): {marks}</div>"]
    if session.eval_result is not None:
        parts.append(eval_html(session.eval_result))
    elif session.train_result is not None:
        parts.append(history_html(session.train_result.history))
    elif session.prep is not None:
        parts.append(report_html(session.prep.report))
    return plots._TABLE_STYLE + "".join(parts)


def session_text(session) -> str:
    done = [name for name, ok in _stages(session) if ok]
    return f"Session({session.cfg.model.name} on {session.cfg.data.source}; done: {', '.join(done) or 'nothing yet'})"
