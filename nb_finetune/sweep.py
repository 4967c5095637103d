"""A small sweep: every combination of a few settings, trained one after another, each run in
its own folder and record. Optionally a run whose validation loss trails the best finished
run's at the same step by more than a margin is stopped there (a simple successive-halving rule)."""
from __future__ import annotations

import dataclasses
import itertools
import threading
from pathlib import Path

import pandas as pd
import yaml

from . import runs
from .config import SECTIONS, RunConfig
from .errors import ConfigError, UserError
from .pipeline import run
from .training.progress import Callback


def parse_grid(specs: list[str]) -> dict[str, list]:
    """["train.learning_rate=1e-4,3e-4", "model.lora_r=8,16"] -> {setting: [values]}; a key that is
    not a setting is a one-line error (values are checked when the configs are built)."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        section, _, name = key.strip().partition(".")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else set()
        if not sep or name not in fields:
            raise UserError(f"--grid {spec!r}: give a setting and its values, e.g. 'train.learning_rate=1e-4,3e-4'"
                            + ("" if not sep else f" ({key.strip()} is not a setting)"))
        grid[key.strip()] = [value_of(v) for v in values.split(",") if v.strip()]
    return grid


def value_of(text: str):
    """A grid value as YAML reads it, and a number written like 1e-4 (a string to YAML) as a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def folder_name(overrides: dict) -> str:
    return ",".join(f"{k.split('.', 1)[1]}={v}" for k, v in overrides.items())


def grid_configs(cfg: RunConfig, grid: dict[str, list]) -> list[RunConfig]:
    """One config per combination, each written to <output_dir>-sweep/<setting=value,...>."""
    root = Path(cfg.train.output_dir)
    root = root.with_name(f"{root.name}-sweep")
    configs = []
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values))
        try:
            one = cfg.with_overrides(overrides | {"train.output_dir": str(root / folder_name(overrides))})
        except ConfigError as err:
            raise UserError(f"--grid: {err}".splitlines()[0]) from err
        configs.append(one)
    return configs


class Either:
    """Stops a run when the sweep is stopped or the run itself is pruned."""

    def __init__(self, sweep: threading.Event):
        self.sweep, self.own = sweep, threading.Event()

    def is_set(self) -> bool:
        return self.sweep.is_set() or self.own.is_set()


class Pruner(Callback):
    """Stops the run at a validation step where its loss exceeds the best earlier run's loss at
    that step by more than `margin` (a share: 0.1 is 10%)."""

    def __init__(self, best: pd.Series, margin: float, stop: Either):
        self.best, self.margin, self.stop, self.pruned_at = best, margin, stop, None

    def on_evaluate(self, row: dict, history: pd.DataFrame) -> None:
        step, loss = row.get("step"), row.get("val_loss")
        if loss is None or step not in self.best.index:
            return
        if loss > self.best[step] * (1 + self.margin):
            self.pruned_at = step
            self.stop.own.set()


@dataclasses.dataclass
class SweepResult:
    folder: Path
    runs: list = dataclasses.field(default_factory=list)  # each run's folder, in the order they ran
    failed: list = dataclasses.field(default_factory=list)  # (folder, the error's line)
    pruned: list = dataclasses.field(default_factory=list)  # the folders of runs stopped by pruning
    pruned_steps: int = 0  # training steps not spent on them
    stopped: bool = False

    def table(self) -> pd.DataFrame:
        """The sweep's runs ranked by validation loss."""
        found, _ = runs.find_runs(self.folder)
        return runs.table(found).sort_values("val_loss", na_position="last").reset_index(drop=True)


def run_sweep(cfg: RunConfig, grid: dict[str, list], stop: threading.Event | None = None, progress=print,
              callbacks=(), on_run=None, prune: float | None = None, source=None) -> SweepResult:
    """Each combination in turn, with the training `callbacks`; `on_run(session)` after each run
    that ends. A run that fails is recorded as failed and the sweep goes on; Stop ends the current
    run and the sweep. `prune`: the margin for stopping a run that trails the best one (None: never)."""
    configs, stop = grid_configs(cfg, grid), stop or threading.Event()
    result, best = SweepResult(Path(configs[0].train.output_dir).parent), pd.Series(dtype=float)
    for i, one in enumerate(configs, 1):
        if stop.is_set():
            break
        progress(f"sweep run {i}/{len(configs)}: {Path(one.train.output_dir).name}")
        either = Either(stop)
        pruner = Pruner(best, prune, either) if prune is not None and len(best) else None
        try:
            session = run(one, [*callbacks, pruner] if pruner else list(callbacks), either, progress, source)
        except Exception as err:  # noqa: BLE001 - its record says failed; the other runs still run
            result.failed.append((one.train.output_dir, f"{type(err).__name__}: {err}".splitlines()[0]))
            progress(f"sweep run {i} failed: {result.failed[-1][1]}")
            continue
        result.runs.append(session.output_dir)
        if pruner is not None and pruner.pruned_at is not None:
            result.pruned.append(session.output_dir)
            result.pruned_steps += prune_note(session, pruner.pruned_at, progress)
        elif not session.train_result.stopped:
            best = best_curve(best, session.train_result.history)
        if on_run is not None:
            on_run(session)
    result.stopped = stop.is_set()
    return result


def prune_note(session, step: int, progress) -> int:
    """Mark a pruned run in its record; the steps it did not train."""
    planned = (session.record.fields.get("planned_steps") if session.record else None) or 0
    saved = max(int(planned) - session.train_result.global_step, 0)
    session.note(status="pruned", error=f"validation loss trailed the best run's at step {step}")
    progress(f"pruned at step {step}: its validation loss trailed the best run's; {saved} steps saved")
    return saved


def best_curve(best: pd.Series, history: pd.DataFrame) -> pd.Series:
    """The lowest validation loss at each validation step over the runs so far."""
    val = history.dropna(subset=["val_loss"]).set_index("step")["val_loss"] if len(history) else pd.Series()
    return val if best.empty else pd.concat([best, val], axis=1).min(axis=1)
