"""Runs: the runs in a folder, this session's or an earlier one's, side by side. A sortable
table (what each changed against a baseline run, its final figures, how it ended), the chosen
runs' curves in one plot (the loss, or preference runs' reward margin or accuracy), the config
diff of two runs, and for one run: load its settings into
every panel, resume it when it was stopped, or delete it (after a confirmation). Below, a small
sweep over a grid of settings, run after run, each listed here as it finishes.

The sweep runs on a background thread with a Stop button, except on Colab (whose front end drops
updates sent from other threads), where it runs in the foreground and an interrupt is the Stop.
"""
from __future__ import annotations

import copy
import html
import threading
from pathlib import Path

import ipywidgets as widgets
import pandas as pd

from .. import runs, sweep
from ..errors import UserError
from ..render import figures, tables
from .common import Panel, Picture, message_html, on_colab

COLUMNS = list(runs.table([]).columns)  # the sort choices: every column of the table
CURVES_AT_FIRST = 6  # the newest runs plotted when the panel opens: more lines are hard to tell apart
RESUMABLE = ("stopped", "interrupted")  # a run that ended early on purpose or lost its kernel
ROW_CLASS = {"failed": "error", "stopped": "warning", "interrupted": "warning", "pruned": "warning"}
STYLE = {"description_width": "90px"}
GRID_EXAMPLE = "train.learning_rate=1e-4,3e-4\nmodel.lora_r=8,16"


def checkpoint(run: runs.Run) -> Path | None:
    """The newest checkpoint a run left, or None."""
    found = sorted((run.folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    return found[-1] if found else None


def resumable(run: runs.Run | None) -> bool:
    return run is not None and run.status in RESUMABLE and checkpoint(run) is not None


def compact(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as the panel shows it, narrower: no preference columns where no run is a
    preference run, no bias gate's where no run was probed, one test figure named in its header
    where every run has the same one, and seconds and tokens/s as whole numbers."""
    if (frame["method"].fillna("sft") == "sft").all():
        frame = frame.drop(columns=runs.PREFERENCE_COLUMNS)
    if (frame["bias_gate"].fillna("") == "").all():
        frame = frame.drop(columns=["bias_gate"])
    metrics = set(frame["test_metric"])
    if len(metrics) == 1 and "" not in metrics:
        frame = frame.rename(columns={"test": f"test {metrics.pop().replace('_', ' ')}"}).drop(columns="test_metric")
    whole = {c: frame[c].map(lambda v: "" if pd.isna(v) else f"{v:,.0f}") for c in ("seconds", "tokens_per_s")}
    return frame.assign(**whole)


class RunsPanel(Panel):
    """`folder`: where the runs are (default: the folder above train.output_dir, so every run
    made from these settings, and a sweep's, is listed). `foreground`: run a sweep on the main
    thread (default: on Colab only)."""

    title = "Runs"

    def __init__(self, shared=None, config=None, data=None, folder=None, foreground: bool | None = None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        self.foreground = on_colab() if foreground is None else foreground
        self.found: list[runs.Run] = []  # the runs in the folder, newest first
        self.skipped = 0
        self.figure = None  # the curves' Figure last shown, for tests and for saving
        self.sweep_result: sweep.SweepResult | None = None
        self.sweeping = False
        self._syncing = False  # while the choices are refilled: one redraw after, not one per change
        self._lock = threading.RLock()  # a sweep's thread and a click may refresh at once
        self._sweep_stop = threading.Event()
        self._sweep_thread: threading.Thread | None = None
        self._build_listing(folder)
        self._build_actions()
        self._build_sweep()
        self.children = [widgets.HBox([self.folder, self.refresh_button, self.count]), self.status, self.error,
                         self.warnings, widgets.HBox([self.sort, self.ascending, self.baseline]), self.table,
                         widgets.HBox([self.chosen, self.curve]), self.plot,
                         widgets.HBox([self.selected, self.load_button, self.resume_button, self.delete_button]),
                         self.confirm, self.diff, self.sweep_box]
        self.shared.observe(self._on_event)
        self.run_action(None, self.refresh)

    # -- building ---------------------------------------------------------------------------
    def _build_listing(self, folder) -> None:
        """The folder, the table with its order and baseline, the runs to plot and the plot."""
        if folder is None:
            folder = Path(str(self.shared.get("train.output_dir"))).parent
        self.folder = widgets.Text(value=str(folder), description="folder", style=STYLE, continuous_update=False,
                                   layout=widgets.Layout(width="420px"))
        self.refresh_button = self.button("Refresh", self.refresh, "", "refresh")
        self.count = widgets.HTML()
        self.sort = widgets.Dropdown(options=COLUMNS, value="started", description="sort by", style=STYLE)
        self.ascending = widgets.Checkbox(value=False, description="ascending", indent=False,
                                          layout=widgets.Layout(width="110px"))
        self.baseline = widgets.Dropdown(options=[], description="baseline", style=STYLE,
                                         layout=widgets.Layout(width="420px"))
        self.table = widgets.HTML(layout=widgets.Layout(overflow_x="auto"))  # a wide table scrolls, not spills
        self.chosen = widgets.SelectMultiple(options=[], description="curves of", rows=4, style=STYLE,
                                             layout=widgets.Layout(width="520px"))
        self.curve = widgets.Dropdown(options=[(name.replace("_", " "), name) for name in runs.CURVES],
                                      value="loss", description="curve", style=STYLE,
                                      layout=widgets.Layout(width="260px"))
        self.plot = Picture("The chosen runs' training and validation curves appear here.")
        self.table.add_class("nbft-runs-table")
        self.plot.image.add_class("nbft-runs-plot")
        self.folder.observe(lambda c: self.run_action(None, self.refresh), names="value")
        for control, redraw in ((self.sort, self.show_table), (self.ascending, self.show_table),
                                (self.baseline, self.show_all), (self.chosen, self.show_curves),
                                (self.curve, self.show_curves)):
            control.observe(lambda c, redraw=redraw: self._redraw(redraw), names="value")

    def _build_actions(self) -> None:
        """One run chosen: its config diff against the baseline, and what can be done with it."""
        self.selected = widgets.Dropdown(options=[], description="run", style=STYLE,
                                         layout=widgets.Layout(width="420px"))
        # Each button's state is set by the refresh its work ends with, so the Refresh button
        # is the one held while it works.
        self.load_button = self.button("Load this config", self.load_config, "", "upload",
                                       waits=self.refresh_button)
        self.resume_button = self.button("Resume", self.resume, "warning", "play", waits=self.refresh_button)
        self.delete_button = self.button("Delete", self.ask_delete, "danger", "trash", waits=self.refresh_button)
        self.confirm = widgets.HBox()  # "Yes, delete NAME" and "Cancel", made when Delete is clicked
        self.diff = widgets.HTML()
        self.diff.add_class("nbft-runs-diff")
        self.selected.observe(lambda c: self._redraw(self.show_selected), names="value")

    def _build_sweep(self) -> None:
        """A grid of settings (one `section.setting=v1,v2` per line), optional pruning, Start/Stop."""
        self.grid = widgets.Textarea(value="", placeholder=GRID_EXAMPLE, description="grid", style=STYLE,
                                     layout=widgets.Layout(width="520px", height="60px"))
        self.prune = widgets.Checkbox(value=False, description="prune: stop a run whose validation loss trails "
                                      "the best run's by more than", indent=False, layout=widgets.Layout(width="auto"))
        self.margin = widgets.FloatText(value=0.1, step=0.05, disabled=True, layout=widgets.Layout(width="80px"))
        self.prune.observe(lambda c: setattr(self.margin, "disabled", not c["new"]), names="value")
        self.sweep_button = widgets.Button(description="Start sweep", button_style="success", icon="play")
        self.stop_sweep_button = widgets.Button(description="Stop sweep", button_style="danger", icon="stop",
                                                disabled=True)
        self.sweep_button.on_click(lambda b: self.start_sweep())
        self.stop_sweep_button.on_click(lambda b: self.stop_sweep())
        self.sweep_status = widgets.HTML()
        self.ranked = widgets.HTML()
        self.ranked.add_class("nbft-runs-ranked")
        help_line = widgets.HTML("<span style='color:#666'>every combination of the values, trained one after "
                                 "another from the current settings into &lt;output_dir&gt;-sweep/</span>")
        body = widgets.VBox([help_line, self.grid, widgets.HBox([self.prune, self.margin]),
                             widgets.HBox([self.sweep_button, self.stop_sweep_button]), self.sweep_status,
                             self.ranked])
        self.sweep_box = widgets.Accordion(children=[body], selected_index=None)
        self.sweep_box.set_title(0, "Sweep: a grid of settings")

    # -- the list -----------------------------------------------------------------------------
    def _on_event(self, event: str) -> None:
        # A run has ended (or its test been added to its record) in another tab.
        if event in ("train", "eval"):
            self.run_action(None, self.refresh)

    def _redraw(self, fn) -> None:
        if not self._syncing:
            self.run_action(None, fn)

    def refresh(self) -> None:
        """Read the folder again and redraw everything, keeping the choices that still exist."""
        with self._lock:
            folder = Path(self.folder.value.strip() or ".").expanduser()
            if folder.is_dir():
                self.found, self.skipped = runs.find_runs(folder)
                skipped = (f"; {self.skipped} folder(s) skipped: no readable run record" if self.skipped else "")
                self.count.value = f"{len(self.found)} run(s) in {html.escape(str(folder))}{skipped}"
            else:
                self.found, self.skipped = [], 0
                self.count.value = f"no folder {html.escape(str(folder))} yet: runs appear here once one has trained"
            self._refill_choices()
            self.show_all()

    def _refill_choices(self) -> None:
        """The run choices for the current list: a choice kept while its run is there; the baseline
        defaults to the oldest run, the chosen run to the newest (and to a run that has just
        appeared), and new runs join the plot."""
        names = [r.name for r in self.found]  # newest first
        before = set(self.baseline.options)
        new = [n for n in names if n not in before] if before else names[:CURVES_AT_FIRST]
        self._syncing = True
        try:
            for control, default in ((self.baseline, names[-1:]), (self.selected, names[:1])):
                keep = control.value if control.value in names else (default[0] if default else None)
                if control is self.selected and before and new:  # a run just ended: show what it changed
                    keep = new[0]
                control.options = names
                control.value = keep
            kept = [n for n in self.chosen.value if n in names]
            self.chosen.options = names
            self.chosen.value = tuple(kept + [n for n in new if n not in kept])
        finally:
            self._syncing = False

    def by_name(self, name) -> runs.Run | None:
        return next((r for r in self.found if r.name == name), None)

    def show_all(self) -> None:
        self.show_table()
        self.show_curves()
        self.show_selected()

    def show_table(self) -> None:
        if not self.found:
            self.table.value = ""
            return
        frame = runs.table(self.found, self.by_name(self.baseline.value))
        if self.sort.value == "started":  # shown to the minute, which ties; the list is newest first already
            frame = frame.iloc[::-1] if self.ascending.value else frame
        else:
            frame = frame.sort_values(self.sort.value, ascending=self.ascending.value, na_position="last",
                                      kind="stable")
        frame = compact(frame)
        rows = frame["status"].map(lambda s: ROW_CLASS.get(s, "ok"))
        self.table.value = tables.table_html(frame.reset_index(drop=True), row_class=rows.reset_index(drop=True))

    def show_curves(self) -> None:
        chosen = [r for r in self.found if r.name in self.chosen.value]
        if not chosen:
            self.figure = None
            self.plot.clear()
            return
        value = self.curve.value
        self.figure = figures.runs_figure(runs.curves(chosen, self.by_name(self.baseline.value), value),
                                          f"{value.replace('_', ' ')} of each run", value)
        self.plot.show(self.figure)

    def show_selected(self) -> None:
        """The chosen run's config diff against the baseline, and which of its buttons can work."""
        run, baseline = self.by_name(self.selected.value), self.by_name(self.baseline.value)
        self.confirm.children = []  # a question about another run no longer stands
        self.load_button.disabled = self.delete_button.disabled = run is None
        self.resume_button.disabled = not resumable(run)
        if run is None or baseline is None:
            self.diff.value = ""
        elif run is baseline:
            self.diff.value = f"<span style='color:#666'>{html.escape(run.name)} is the baseline</span>"
        else:
            # Every run has its own output_dir, and the run names say which.
            diff = runs.config_diff(baseline, run).drop(index="train.output_dir", errors="ignore")
            self.diff.value = (f"<b>settings of {html.escape(run.name)} against the baseline</b>"
                               + tables.table_html(diff, index=True) if len(diff) else
                               "<span style='color:#666'>the same settings as the baseline</span>")

    # -- one run ------------------------------------------------------------------------------
    def current(self) -> runs.Run:
        run = self.by_name(self.selected.value)
        if run is None:
            raise UserError("choose a run first")
        return run

    def load_config(self) -> None:
        """The run's settings into every panel; Start then trains a new run beside it."""
        run = self.current()
        self._use(run, resume_from="")
        self.say(f"settings of {run.name} loaded into every panel: Start in the Train tab trains a new run "
                 "beside it")
        self.show_selected()

    def resume(self) -> None:
        """The run's settings, to continue from its newest checkpoint in its own folder."""
        run = self.current()
        if not resumable(run):
            raise UserError(f"{run.name} is {run.status}: only a stopped or interrupted run with a checkpoint "
                            "can be resumed")
        self._use(run, resume_from="last", output_dir=str(run.folder))
        self.say(f"ready to resume {run.name} from {checkpoint(run).name}: press Start in the Train tab")
        self.shared.notify("resume")  # the studio brings the Train tab forward
        self.show_selected()

    def _use(self, run: runs.Run, **train) -> None:
        if self.shared.busy:
            raise UserError("a run is training: load settings once it has ended (or Stop it)")
        config = copy.deepcopy(run.config)
        config.setdefault("train", {}).update(train)
        self.shared.use(config)

    def ask_delete(self) -> None:
        run = self.current()
        if run.status == "running":
            raise UserError(f"{run.name} is still running: stop it before deleting it")
        yes = widgets.Button(description=f"Yes, delete {run.name}", button_style="danger", icon="trash",
                             layout=widgets.Layout(width="auto"))
        no = widgets.Button(description="Cancel", layout=widgets.Layout(width="auto"))
        yes.on_click(lambda b: self.run_action(b, self.delete, run))
        no.on_click(lambda b: self.cancel_delete())
        self.confirm.children = [widgets.HTML(f"delete {html.escape(str(run.folder))} and everything in it? "),
                                 yes, no]

    def cancel_delete(self) -> None:
        self.confirm.children = []

    def delete(self, run: runs.Run) -> None:
        self.confirm.children = []
        runs.delete(run)
        self.say(f"deleted {run.folder}")
        self.refresh()

    # -- the sweep ----------------------------------------------------------------------------
    def start_sweep(self) -> None:
        """Every combination of the grid from the current settings, one run after another."""
        if self.sweeping:  # two quick clicks start one sweep
            return
        self.show_error("")
        try:
            lines = [line for line in self.grid.value.splitlines() if line.strip()]
            if not lines:
                raise UserError(f"sweep: give one setting and its values per line, e.g. {GRID_EXAMPLE.splitlines()[0]}")
            grid, cfg = sweep.parse_grid(lines), self.shared.config()
            count = len(sweep.grid_configs(cfg, grid))  # bad values are named now, not after a run
            if self.shared.busy:
                raise UserError("a run is training in the Train tab: start the sweep once it has ended")
        except Exception as err:  # noqa: BLE001 - shown in the panel
            self.handle(err)
            return
        self.sweeping = True
        self._sweep_stop.clear()
        self.sweep_button.disabled, self.stop_sweep_button.disabled = True, self.foreground
        self.ranked.value = ""
        self.sweep_status.value = f"sweep of {count} runs starting"
        args = (cfg, grid, self.margin.value if self.prune.value else None)
        if self.foreground:
            self._sweep(*args)
        else:
            self._sweep_thread = threading.Thread(target=self._sweep, args=args, name="nb_finetune-sweep", daemon=True)
            self._sweep_thread.start()

    def stop_sweep(self) -> None:
        if self.sweeping:
            self._sweep_stop.set()
            self.sweep_status.value += " · stopping after the current step"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a background sweep ends (for scripts and tests); True if it ended."""
        if self._sweep_thread is not None:
            self._sweep_thread.join(timeout)
            return not self._sweep_thread.is_alive()
        return True

    def _sweep(self, cfg, grid, prune) -> None:
        caught: list = []
        try:
            with self.working() as caught:
                self.sweep_result = sweep.run_sweep(cfg, grid, self._sweep_stop, SweepProgress(self),
                                                    on_run=self._sweep_ran,
                                                    prune=prune, source=self.shared.source)
            self.show_sweep(self.sweep_result)
        except KeyboardInterrupt:  # the foreground's Stop, before a run had begun training
            self.sweep_status.value = message_html("sweep interrupted", "warning")
        except Exception as err:  # noqa: BLE001 - shown in the panel, the buttons come back
            self.handle(err)
        finally:
            self.sweeping = False
            self.sweep_button.disabled, self.stop_sweep_button.disabled = False, True
            self.show_warnings(caught)

    def _sweep_ran(self, session) -> None:
        # A run stopped but not pruned was stopped by the user (in the foreground, by an
        # interrupt, which the sweep's own stop flag does not see): the sweep ends with it.
        if session.train_result is not None and session.train_result.stopped and \
                (session.record is None or session.record.fields.get("status") == "stopped"):
            self._sweep_stop.set()
        self.run_action(None, self.refresh)

    def show_sweep(self, result: sweep.SweepResult) -> None:
        """The sweep's runs ranked, and what pruning saved."""
        pruned = (f"; {len(result.pruned)} pruned, {result.pruned_steps} training steps saved" if result.pruned
                  else "")
        failed = "".join(f"; {Path(folder).name} failed: {error}" for folder, error in result.failed)
        ended = "stopped" if result.stopped else "done"
        self.sweep_status.value = html.escape(f"sweep {ended}: {len(result.runs)} run(s) in {result.folder}{pruned}"
                                              f"{failed}")
        ranked = result.table()
        self.ranked.value = ("<b>the sweep's runs, best validation loss first</b>"
                             + tables.table_html(ranked.drop(columns=["started", "test_metric"])))
        self.run_action(None, self.refresh)


class SweepProgress:
    """The sweep's messages in one line: which run of how many, and what it is doing now."""

    def __init__(self, panel: RunsPanel):
        self.panel, self.run_line = panel, ""

    def __call__(self, message: str) -> None:
        first = str(message).splitlines()[0] if str(message).strip() else ""
        if first.startswith(("sweep run", "pruned")):
            self.run_line = first
        text = self.run_line if first == self.run_line else f"{self.run_line} · {first}"
        self.panel.sweep_status.value = f"<span style='color:#444'>{html.escape(text)}</span>"
