"""Progress: the engine's events (`Callback`), one clock with ETA for every front end, and the
console's one line per event."""
from __future__ import annotations

import math
import time

import pandas as pd


class Callback:
    """Receives the engine's events; override what you need. `info` and rows are plain dicts."""

    def on_train_begin(self, info: dict) -> None: ...

    def on_log(self, row: dict, history: pd.DataFrame) -> None: ...

    def on_evaluate(self, row: dict, history: pd.DataFrame) -> None: ...

    def on_train_end(self, result) -> None: ...


def clock(seconds: float) -> str:
    """m:ss, or --:-- for a time not known yet."""
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class StepClock:
    """Time since training began and the time left, from the share of steps done."""

    def __init__(self):
        self.begin(0)

    def begin(self, max_steps: int) -> None:
        self.start, self.max_steps = time.perf_counter(), max_steps

    def times(self, step: int) -> tuple[str, str]:
        """(elapsed, eta) as m:ss."""
        elapsed = time.perf_counter() - self.start
        done = step / max(self.max_steps, 1)
        return clock(elapsed), clock(elapsed * (1 - done) / done if done else float("nan"))


def start_line(info: dict) -> str:
    """What a run is about to do, in one line."""
    return (f"training: {info['max_steps']} steps, {info['train_rows']:,} rows, effective batch "
            f"{info['effective_batch']} ({info['batch_size']} per process x {info['processes']} "
            f"process(es) x {info['grad_accum']} accumulation), {info['trainable']:,} trainable parameters, "
            f"precision {info['precision']}" + ("; padding-free batches" if info.get("padding_free") else "")
            + (f"; {info['kernels']}" if info.get("kernels") else ""))


class ConsoleProgress(Callback):
    """One line per log event, for the command line."""

    def __init__(self, print_fn=print):
        self.print = print_fn
        self.clock = StepClock()

    def on_train_begin(self, info):
        self.clock.begin(info["max_steps"])
        self.print(start_line(info))

    def line(self, row, text):
        elapsed, eta = self.clock.times(row["step"])
        self.print(f"  step {row['step']:>4}/{self.clock.max_steps}  {text}  elapsed {elapsed}  eta {eta}")

    def on_log(self, row, history):
        self.line(row, f"loss {row['train_loss']:.4f}  lr {row['learning_rate']:.2e}  "
                       f"{row['tokens_per_second']:,.0f} tok/s")

    def on_evaluate(self, row, history):
        acc = row.get("val_accuracy")
        self.line(row, f"val_loss {row['val_loss']:.4f}" + ("" if acc is None or math.isnan(acc)
                                                               else f"  val_acc {acc:.3f}"))
