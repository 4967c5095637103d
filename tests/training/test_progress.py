"""Progress: the clock every front end shows, and the console's one line per event."""
import math
import re
from types import SimpleNamespace

from nb_finetune.training import ConsoleProgress, progress
from nb_finetune.training.progress import StepClock, clock, start_line

INFO = {"max_steps": 4, "train_rows": 1234, "effective_batch": 8, "batch_size": 2, "processes": 1, "grad_accum": 4,
        "trainable": 56789, "precision": "float32"}


def test_the_clock_reads_minutes_and_seconds_and_dashes_for_an_unknown_time(monkeypatch):
    assert clock(0) == "0:00" and clock(65.9) == "1:05" and clock(3725) == "62:05"
    assert clock(float("nan")) == "--:--" and clock(math.inf) == "--:--"
    now = [1000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    steps = StepClock()
    steps.begin(8)
    assert steps.times(0) == ("0:00", "--:--")  # nothing done yet: no estimate
    now[0] += 90
    assert steps.times(2) == ("1:30", "4:30")  # 2 of 8 steps in 90 s: 6 more take 270 s


def test_the_start_line_says_what_the_run_will_do():
    line = start_line(INFO)
    assert line == ("training: 4 steps, 1,234 rows, effective batch 8 (2 per process x 1 process(es) x 4 "
                    "accumulation), 56,789 trainable parameters, precision float32")
    assert start_line(INFO | {"kernels": "CPU kernels: fused loss"}) == line + "; CPU kernels: fused loss"


def test_console_progress_prints_one_line_per_event():
    printed = []
    console = ConsoleProgress(printed.append)
    console.on_train_begin(INFO)
    row = {"step": 2, "train_loss": 1.23456, "learning_rate": 1e-3, "tokens_per_second": 4321.5}
    console.on_log(row, None)
    console.on_evaluate({"step": 2, "val_loss": 0.98765, "val_accuracy": 0.75}, None)
    console.on_evaluate({"step": 4, "val_loss": 0.5, "val_accuracy": float("nan")}, None)
    assert printed[0] == start_line(INFO)
    times = r"  elapsed \d+:\d\d  eta \d+:\d\d"
    assert re.fullmatch(r"  step    2/4  loss 1\.2346  lr 1\.00e-03  4,322 tok/s" + times, printed[1])
    assert re.fullmatch(r"  step    2/4  val_loss 0\.9877  val_acc 0\.750" + times, printed[2])
    assert re.fullmatch(r"  step    4/4  val_loss 0\.5000" + times, printed[3])  # no accuracy: not shown
    assert len(printed) == 4
