"""A folder of runs, read and compared: listing, a run's settings against a baseline's, two
configs side by side, the curves of several runs. Reading never writes to a run folder; only
`delete` removes one, and only a folder that holds a run record."""
from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .record import FORMAT, RECORD


@dataclass
class Run:
    name: str      # the folder, relative to the folder of runs
    folder: Path
    record: dict

    @property
    def status(self) -> str:
        """finished, stopped, failed, running, or interrupted (its process is gone: a kernel restart)."""
        status = self.record.get("status", "?")
        if status == "running" and not alive(self.record):
            return "interrupted"
        return status

    @property
    def config(self) -> dict:
        return self.record.get("config") or {}

    def settings(self) -> dict:
        """The config flattened: {"train.learning_rate": 0.0002, ...}."""
        return {f"{section}.{key}": value for section, fields in self.config.items() if isinstance(fields, dict)
                for key, value in fields.items()}

    def history(self) -> pd.DataFrame:
        path = self.folder / "history.csv"
        return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["step", "train_loss", "val_loss"])

    def test_metric(self) -> tuple[str, float | None]:
        """The tuned model's headline test figure: accuracy for a classifier, preference accuracy for
        held-out pairs, else the first one."""
        rows = [r for r in self.record.get("test_metrics") or [] if r.get("model") == "tuned"]
        if not rows:
            return "", None
        row = {k: v for k, v in rows[0].items() if k not in ("model", "pairs") and isinstance(v, (int, float))}
        name = next((k for k in ("accuracy", "preference_accuracy") if k in row), next(iter(row), ""))
        return name, row.get(name)


def alive(record: dict) -> bool:
    """Whether the process that writes a running record is still there (on another host: assumed so)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def read_run(folder: Path, root: Path) -> Run | None:
    """The run in `folder`, or None when its record is missing, half-written or not ours."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    return Run(folder.relative_to(root).as_posix() if folder != root else folder.name, folder, record)


def find_runs(root: str | Path) -> tuple[list[Run], int]:
    """(the runs under `root`, newest first; how many folders looked like runs but could not be
    read). A folder is a run when it has a run record, a history or a report."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"no folder of runs at {root}: give the folder your runs' output_dir folders are in")
    candidates = {p.parent for pattern in (RECORD, "history.csv", "report.json") for p in root.rglob(pattern)
                  if "checkpoints" not in p.relative_to(root).parts}
    runs = [run for folder in sorted(candidates) if (run := read_run(folder, root)) is not None]
    runs.sort(key=lambda r: str(r.record.get("started") or ""), reverse=True)
    return runs, len(candidates) - len(runs)


def find(runs: list[Run], name: str) -> Run:
    for run in runs:
        if name in (run.name, str(run.folder)):
            return run
    raise UserError(f"no run named {name!r}; runs: {', '.join(r.name for r in runs) or 'none'}")


def changed(run: Run, baseline: Run | None) -> dict:
    """The settings where `run` differs from `baseline` (output_dir aside: every run has its own)."""
    if baseline is None or baseline is run:
        return {}
    mine, theirs = run.settings(), baseline.settings()
    return {k: mine.get(k) for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k) and k != "train.output_dir"}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in changes.items()) or "-"


def table(runs: list[Run], baseline: Run | None = None) -> pd.DataFrame:
    """One row per run: name, when, what differs from the baseline, the method (and beta for a
    preference method), final validation figures (a preference run's reward margin too), test
    metric, time, tokens/s, status, and the bias gate's verdict."""
    rows = []
    for run in runs:
        training = run.record.get("training") or {}
        metric, value = run.test_metric()
        method = (run.config.get("train") or {}).get("method", "sft")
        rows.append({"run": run.name, "started": str(run.record.get("started") or "")[:16].replace("T", " "),
                     "changed": describe_changes(changed(run, baseline)), "method": method,
                     "beta": None if method == "sft" else (run.config.get("train") or {}).get("beta"),
                     "val_loss": training.get("val_loss"), "val_accuracy": training.get("val_accuracy"),
                     "reward_margin": training.get("reward_margin"), "test": value, "test_metric": metric,
                     "seconds": run.record.get("seconds"), "tokens_per_s": training.get("tokens_per_second"),
                     "steps": training.get("steps"), "status": run.status, "bias_gate": gate_verdict(run)})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


TABLE_COLUMNS = ["run", "started", "changed", "method", "beta", "val_loss", "val_accuracy", "reward_margin", "test",
                 "test_metric", "seconds", "tokens_per_s", "steps", "status", "bias_gate"]
PREFERENCE_COLUMNS = ["method", "beta", "reward_margin"]  # empty or 'sft' for every run of imitation
CURVES = {"loss": ("train_loss", "val_loss"), "reward_margin": ("reward_margin", "val_reward_margin"),
          "reward_accuracy": ("reward_accuracy", "val_reward_accuracy")}


def gate_verdict(run: Run) -> str:
    """failed, passed, report only, or '' when the run's probes were not run."""
    gate = run.record.get("bias_gate")
    if not gate:
        return ""
    return "failed" if gate.get("failed") else "passed" if gate.get("enforced") else "report only"


def config_diff(a: Run, b: Run) -> pd.DataFrame:
    """The settings that differ between two runs, side by side."""
    left, right = a.settings(), b.settings()
    keys = [k for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k)]
    return pd.DataFrame({a.name: [left.get(k) for k in keys], b.name: [right.get(k) for k in keys]},
                        index=pd.Index(keys, name="setting"))


def curves(runs: list[Run], baseline: Run | None = None, value: str = "loss") -> pd.DataFrame:
    """The runs' training and validation curves of `value` (a name in CURVES: loss, or a preference
    run's reward_margin or reward_accuracy) in long form (run, step, split, `value`), each run
    labelled by its name and what it changed."""
    if value not in CURVES:
        raise UserError(f"no curve {value!r}; choose one of {', '.join(CURVES)}")
    frames = []
    for run in runs:
        history, label = run.history(), f"{run.name} ({describe_changes(changed(run, baseline))})"
        for split, column in zip(("train", "validation"), CURVES[value]):
            if column in history:
                part = history[["step", column]].dropna().rename(columns={column: value})
                frames.append(part.assign(run=label, split=split))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", value, "run", "split"])


def delete(run: Run) -> None:
    """Remove a run's folder, after checking it still holds the same run record."""
    if read_run(run.folder, run.folder.parent) is None:
        raise UserError(f"{run.folder} holds no run record: nothing deleted")
    shutil.rmtree(run.folder)


def show(run: Run) -> str:
    """One run on the command line: how it ended, its figures, its data, versions and hardware."""
    r, training = run.record, run.record.get("training") or {}
    metric, value = run.test_metric()
    lines = [f"run {run.name} ({run.folder})", f"  status: {run.status}" + (f" - {r['error']}" if r.get("error") else ""),
             f"  started {r.get('started')}, ended {r.get('ended') or '-'}, {r.get('seconds') or '-'} s",
             "  training: " + ", ".join(f"{k} {v}" for k, v in training.items()),
             f"  test {metric}: {value}" if metric else "  test: not run",
             f"  bias gate: {gate_verdict(run) or 'not run'}",
             "  data: " + json.dumps(r.get("data")), "  versions: " + json.dumps(r.get("versions")),
             "  hardware: " + json.dumps(r.get("hardware")), "  settings:"]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in run.settings().items()])
