"""The record of one run: run.json in its folder, written when training starts and updated as
the run goes on (each log step, the end of training, the test, the bias gate), so a run that
fails, is stopped or loses its kernel is still listed with what it had done."""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from .. import hardware
from ..data.columns import frame_digest

RECORD = "run.json"
FORMAT = "nb_finetune.run/1"
PACKAGES = ("nb_finetune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "pandas")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Python's and the installed packages' versions (None where one is absent)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def training_summary(history: pd.DataFrame) -> dict:
    """The last figures of a history: steps, train and validation loss, validation accuracy and
    the median tokens/s (the first steps' warm-up counts less in a median); for a preference run
    also the reward margin (the last validation's, else the last training log's)."""
    def last(column):
        values = history[column].dropna() if column in history else pd.Series(dtype=float)
        return None if values.empty else round(float(values.iloc[-1]), 6)

    speed = history["tokens_per_second"].dropna() if "tokens_per_second" in history else pd.Series(dtype=float)
    summary = {"steps": int(history["step"].max()) if len(history) else 0, "train_loss": last("train_loss"),
               "val_loss": last("val_loss"), "val_accuracy": last("val_accuracy"),
               "tokens_per_second": None if speed.empty else round(float(speed.median()), 1)}
    if "reward_margin" in history:  # a preference run: its rewards' margin, at the last validation if any
        summary["reward_margin"] = last("val_reward_margin") if last("val_reward_margin") is not None \
            else last("reward_margin")
    return summary


def new_folder(folder: str | Path, resuming: bool) -> Path:
    """Where a run writes: `folder`, or when it holds an earlier run (and this one does not
    resume it) the first free `folder-2`, `folder-3`, ... so every run is kept."""
    folder = Path(folder)
    if resuming or not (folder / RECORD).is_file():
        return folder
    return next(p for n in range(2, 10_000) if not (p := folder.with_name(f"{folder.name}-{n}")).exists())


def data_fingerprint(source, splits: dict) -> dict:
    """Where the data came from and a digest of each split, to tell runs on other data apart."""
    return {"source": str(source or "built-in"), "rows": {k: len(v) for k, v in splits.items()},
            "digest": {k: frame_digest(v)[:16] for k, v in splits.items()}}


@contextmanager
def ending_on_failure(record: RunRecord | None):
    """A stage that raises marks the run failed (stopped, for Ctrl-C) in its record first."""
    try:
        yield
    except BaseException as err:
        if record is not None:
            record.end("stopped" if isinstance(err, KeyboardInterrupt) else "failed", err)
        raise


def whole_file(path: Path, text: str) -> None:
    """A whole file or none: written beside and renamed over, so a process killed mid-write never
    leaves half a record or an empty history."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text, encoding="utf-8")
    part.replace(path)


class RunRecord:
    """run.json, kept current. As a training callback (training.progress.Callback's methods) it
    also keeps history.csv current, so a kernel that dies mid-run leaves the curve up to its
    last log step."""

    def __init__(self, folder: str | Path, fields: dict):
        self.folder, self.fields = Path(folder), fields
        self.clock = time.perf_counter() - (fields.get("seconds") or 0)  # a resumed run counts its earlier time

    @classmethod
    def start(cls, folder: str | Path, config: dict, data: dict, resuming: bool = False) -> "RunRecord":
        """A new record, or for a resumed run its earlier record carried on (started, time, resumes)."""
        earlier = (cls.reopen(folder) if resuming else None) or cls(folder, {})
        fields = {"format": FORMAT, "status": "running", "error": None, "started": now(), "ended": None,
                  "seconds": None, "resumed": [], "pid": os.getpid(), "host": socket.gethostname(),
                  "config": config, "data": data, "versions": versions(), "hardware": hardware.describe(),
                  "training": None, "test_metrics": None, "bias_gate": None, "probes": {}}
        if earlier.fields:
            fields |= {"started": earlier.fields.get("started"), "seconds": earlier.fields.get("seconds"),
                       "resumed": [*earlier.fields.get("resumed", []), now()]}
        record = cls(folder, fields)
        record.write()
        return record

    @classmethod
    def reopen(cls, folder: str | Path) -> "RunRecord | None":
        """The record a finished run left in `folder`, to add to (a probe run later), or None."""
        try:
            fields = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls(folder, fields) if isinstance(fields, dict) and fields.get("format") == FORMAT else None

    def update(self, **fields) -> None:
        self.fields.update(fields)
        self.write()

    def end(self, status: str, error: BaseException | None = None, **fields) -> None:
        """How the run ended: finished, stopped or failed (with the error's one line)."""
        self.update(status=status, ended=now(), seconds=round(time.perf_counter() - self.clock, 1),
                    error=None if error is None else f"{type(error).__name__}: {error}".splitlines()[0], **fields)

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        whole_file(self.folder / RECORD, json.dumps(self.fields, indent=2, default=str))

    # -- training events -----------------------------------------------------------------
    def on_train_begin(self, info: dict) -> None:
        self.update(planned_steps=info.get("max_steps"))

    def on_log(self, row: dict, history: pd.DataFrame) -> None:
        self.keep(history)

    def on_evaluate(self, row: dict, history: pd.DataFrame) -> None:
        self.keep(history)

    def on_train_end(self, result) -> None: ...

    def keep(self, history: pd.DataFrame) -> None:
        whole_file(self.folder / "history.csv", history.to_csv(index=False))
        self.update(training=training_summary(history))
