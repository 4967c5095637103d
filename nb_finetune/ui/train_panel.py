"""Training: the objective (SFT, DPO or ORPO, with beta and DPO's loss), Start/Stop, a live plot
of the curves (for preference pairs: the loss, the chosen and rejected rewards and their margin,
the preference accuracy), progress with ETA and tokens/s, and a plain-words diagnosis.

Where training runs: on a background thread in JupyterLab and classic Notebook, so the kernel
stays free to receive the Stop click. Colab's front end drops widget updates sent from other
threads, so there it runs in the foreground, redraws from the main thread, and an interrupt of
the cell (the kernel's KeyboardInterrupt) is the Stop. Either way Stop keeps what was trained:
a checkpoint and the history.
"""
from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets

from ..render import figures
from ..training import HISTORY_COLUMNS, diagnose
from ..training.progress import Callback, StepClock, clock, start_line
from .common import Form, Panel, Picture, message_html, on_colab

REDRAW_SECONDS = 1.0  # at most one plot per second: each redraw takes time from the training thread
METHOD_KEYS = ["train.method", "train.beta", "train.dpo_loss"]


class PanelProgress(Callback):
    """Engine events into the panel's widgets; no printing."""

    def __init__(self, panel: "TrainPanel"):
        self.panel = panel
        self.clock = StepClock()
        self.last_draw = 0.0
        self.history = None

    def on_train_begin(self, info):
        self.clock.begin(info["max_steps"])
        p = self.panel
        p.progress.max = max(info["max_steps"], 1)
        p.progress.value = 0
        p.say(start_line(info))
        self.draw(force=True)

    def show_progress(self, row):
        elapsed, eta = self.clock.times(row["step"])
        speed = self.history["tokens_per_second"].dropna()
        rate = f" · {speed.iloc[-1]:,.0f} tokens/s" if len(speed) else ""
        self.panel.progress.value = min(int(row["step"]), self.panel.progress.max)
        self.panel.progress_text.value = (f"step {row['step']}/{self.clock.max_steps} · elapsed {elapsed} · "
                                          f"eta {eta}{rate}")

    def on_log(self, row, history):
        self.history = history
        self.show_progress(row)
        if "reward_margin" in history:  # a preference run's failure modes show in its training logs
            self.panel.diagnosis.value = f"<b>diagnosis</b>: {html.escape(diagnose(history))}"
        self.draw()

    def on_evaluate(self, row, history):
        self.history = history
        self.show_progress(row)
        self.panel.diagnosis.value = f"<b>diagnosis</b>: {html.escape(diagnose(history))}"
        self.draw()

    def on_train_end(self, result):
        self.history = result.history
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_draw < REDRAW_SECONDS:
            return
        self.last_draw = now
        import pandas as pd
        history = self.history if self.history is not None else pd.DataFrame(columns=HISTORY_COLUMNS)
        preference = "reward_margin" in history or self.panel.shared.get("train.method") != "sft"
        draw = figures.preference_history_figure if preference else figures.history_figure
        self.panel.plot.show(draw(history))
        self.panel.redraws += 1


class TrainPanel(Panel):
    """Start trains with the current settings (loading data, tokenizer and model as needed);
    Stop ends after the current step and keeps a checkpoint and the history.

    `foreground=None` picks by front end: a background thread, except on Colab."""

    title = "Train"

    def __init__(self, shared=None, config=None, data=None, foreground: bool | None = None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        self.foreground = on_colab() if foreground is None else foreground
        self.forms = [Form(self.shared, METHOD_KEYS)]  # what is learned: imitation or preferences
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.start_button.on_click(lambda b: self.start())
        self.stop_button.on_click(lambda b: self.stop())
        self.mode = widgets.HTML(
            "<span style='color:#666'>runs in the foreground (Colab): interrupt the cell to stop; what was "
            "trained is kept</span>" if self.foreground else
            "<span style='color:#666'>runs in the background: Stop ends it after the current step</span>")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="420px"))
        self.progress_text = widgets.HTML()
        self.plot = Picture("The loss curves appear here once training starts.")
        self.diagnosis = widgets.HTML()
        self.outcome = widgets.HTML()
        # Class names let a browser test (or a user's CSS) find these among the widgets.
        self.plot.image.add_class("nbft-train-plot")  # the <img> itself: its src changes
        self.start_button.add_class("nbft-train-start")
        self.stop_button.add_class("nbft-train-stop")
        self.outcome.add_class("nbft-train-outcome")
        self.redraws = 0
        self.running = False
        self.result = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._preference = self.shared.get("train.method") != "sft"  # which curves the empty plot has
        PanelProgress(self).draw(force=True)  # empty axes, so the plot's place is visible
        self.shared.observe(self._on_event)
        self.children = [self.forms[0].widget, widgets.HBox([self.start_button, self.stop_button, self.mode]),
                         widgets.HBox([self.progress, self.progress_text]), self.status, self.error, self.plot,
                         self.diagnosis, self.outcome, self.warnings]

    def _on_event(self, event: str) -> None:
        # A new method changes which curves there are: the empty plot follows it until a run starts.
        preference = self.shared.get("train.method") != "sft"
        if event == "config" and not self.running and self.result is None and preference != self._preference:
            self._preference = preference
            PanelProgress(self).draw(force=True)

    # -- buttons --------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:  # two quick clicks start one run
            if self.running:
                return
            self.running = True
        self.start_button.disabled = True
        self.stop_button.disabled = self.foreground  # in the foreground the kernel cannot hear a click
        self._stop.clear()
        self.show_error("")
        self.outcome.value = self.diagnosis.value = self.warnings.value = ""
        if self.foreground:
            self._run()
        else:
            self._thread = threading.Thread(target=self._run, name="nb_finetune-train", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self.running:
            self._stop.set()
            self.say("stopping after the current step; a checkpoint and the history are kept")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background run ends (for scripts and tests); True if it ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the run --------------------------------------------------------------------------
    def _run(self) -> None:
        caught: list = []
        try:
            with self.working() as caught:
                self._train()
        except KeyboardInterrupt:  # an interrupt before training began (data or model loading)
            self.outcome.value = message_html("interrupted before training started; nothing was trained", "warning")
        except Exception as err:  # noqa: BLE001 - shown in the panel, the buttons come back
            self.handle(err)
        finally:
            self.shared.busy = False
            self.running = False
            self.start_button.disabled = False
            self.stop_button.disabled = True
            self.show_warnings(caught)

    def _train(self) -> None:
        session = self.session()
        self.shared.busy = True
        if session.train_result is not None:
            session.discard_training()  # a new run starts from fresh adapters
        events = PanelProgress(self)
        self.result = session.train([events], self._stop)
        self.shared.set("train.output_dir", str(session.output_dir))  # a new folder when the old one held a run
        self.stop_button.disabled = True  # training is over; the test may still run on this thread
        session.write_outputs()
        r = self.result
        where = session.output_dir
        if r.stopped:
            text = (f"stopped at step {r.global_step}: checkpoint {r.last_checkpoint or '(none yet)'} and "
                    f"{where / 'history.csv'} kept; resume with train.resume_from = 'last'")
        elif r.early_stopped:
            text = f"early stop at step {r.global_step}: validation loss stopped improving"
        else:
            text = f"finished {r.global_step} steps in {clock(r.seconds)}"
        self.outcome.value = message_html(f"{text}. Adapter: {r.adapter_dir}", "warning" if r.stopped else "info")
        if len(r.history):
            self.diagnosis.value = f"<b>diagnosis</b>: {html.escape(diagnose(r.history))}"
        self.say(f"peak memory {session.peak_memory / 2**30:.2f} GiB"
                 + (f" (estimated {session.memory_estimate.total / 2**30:.2f} GiB)" if session.memory_estimate else ""))
        self.shared.notify("train")
