"""A run's report files: report.json (everything known about the run) and the tables beside it,
assembled from a finished or interrupted session's results and written into its folder; the
bias gate's result added to a saved run's report.json."""
from __future__ import annotations

import json
from pathlib import Path

from .. import distributed, hardware
from ..redact import redact

COUNTS = ("rows", "tokens", "trained_tokens", "prompt_truncated", "response_truncated", "dropped_no_trained")


def run_report(session) -> dict:
    """Everything known about the run, for report.json."""
    tr, ev, estimate = session.train_result, session.eval_result, session.memory_estimate
    return {
        "config": session.cfg.to_dict(),
        "hardware": hardware.describe(),
        "data_report": session.prep.report.to_dict() if session.prep else None,
        "tokenization": {k: {f: getattr(v, f) for f in COUNTS} for k, v in session.token_stats.items()},
        "training": None if tr is None else {
            "steps": tr.global_step, "seconds": round(tr.seconds, 1), "stopped": tr.stopped,
            "early_stopped": tr.early_stopped, "adapter": str(tr.adapter_dir),
            "padding_share": tr.padding.shares()},
        "memory": {"estimate_bytes": None if estimate is None else estimate.parts,
                   "peak_bytes": session.peak_memory, "device": hardware.device()},
        "test_metrics": None if ev is None else ev.metrics.reset_index().to_dict(orient="records"),
        "bias_gate": None if session.gate_result is None else session.gate_result.to_dict(),
    }


def report_files(session) -> dict[str, str]:
    """File name -> text: report.json, the data checks and the test's tables."""
    files = {"report.json": json.dumps(run_report(session), indent=2, default=str)}
    if session.prep is not None:
        files["data_report.csv"] = session.prep.report.checks.to_csv(index=False)
    ev = session.eval_result
    if ev is not None:
        files |= {"test_metrics.csv": ev.metrics.to_csv(), "worst_errors.csv": ev.errors.to_csv(index=False),
                  "samples.csv": ev.samples.to_csv(index=False)}
        if ev.confusion is not None:
            files["confusion_matrix.csv"] = ev.confusion.to_csv()
    return files


def write_reports(session) -> Path:
    """The report files into output_dir, with the config, every text passed through `redact` (no
    access tokens). Under several processes only the main one writes."""
    out = session.output_dir
    if not distributed.is_main():
        return out
    out.mkdir(parents=True, exist_ok=True)
    session.cfg.save(out / "config.yaml")
    for name, text in report_files(session).items():
        (out / name).write_text(redact(text), encoding="utf-8")
    return out


def write_gate(session) -> Path:
    """The bias gate's result into output_dir's report.json, the rest of a saved run's report
    kept (a finished run probed again); returns the file."""
    report = session.output_dir / "report.json"
    saved = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else run_report(session)
    text = json.dumps(saved | {"bias_gate": session.gate_result.to_dict()}, indent=2, default=str)
    report.write_text(redact(text), encoding="utf-8")
    return report
