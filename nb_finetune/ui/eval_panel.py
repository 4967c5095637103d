"""Evaluation: test metrics beside the baselines, the confusion matrix, the worst errors,
generations of the base and the tuned model side by side, for test prompts and for yours, and a
chat playground streaming both models' answers. For preference pairs: the preference accuracy and
mean margin of tuned and base with their intervals, and each held-out pair's margin, base
against tuned."""
from __future__ import annotations

import html
import threading

import ipywidgets as widgets
import pandas as pd

from .. import evaluation
from ..render import figures, tables
from ..render.html import instruction
from .common import Form, Panel, Picture, message_html, on_colab

KEYS = ["eval.baselines", "eval.max_test_rows", "eval.num_samples", "eval.max_new_tokens", "eval.worst_errors"]


class EvalPanel(Panel):
    title = "Evaluate"

    def __init__(self, shared=None, config=None, data=None, foreground: bool | None = None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        # Colab hears no widget message while a cell runs: chat there in the foreground (interrupt
        # to stop); elsewhere on a thread, so the Stop button is heard.
        self.foreground = on_colab() if foreground is None else foreground
        self.forms = [Form(self.shared, KEYS)]
        self.after_training = widgets.Checkbox(value=True, description="evaluate when training ends", indent=False)
        self.evaluate_button = self.button("Evaluate", self.evaluate, "primary", "check")
        self.note = widgets.HTML()
        self.metrics = widgets.HTML()
        self.metrics.add_class("nbft-eval-metrics")
        self.confusion = Picture("The confusion matrix appears here after Evaluate (for label tasks).")
        self.margins = Picture("Each held-out pair's margin, base against tuned, appears here after Evaluate "
                               "(for preference pairs).")
        self.margins.image.add_class("nbft-eval-margins")
        self.instruction = widgets.HTML()
        self.errors = widgets.HTML()
        self.samples = widgets.HTML()
        self.samples.add_class("nbft-eval-samples")
        self.prompt = widgets.Textarea(placeholder="type a prompt (or a text to classify)",
                                       layout=widgets.Layout(width="420px", height="60px"))
        self.generate_button = self.button("Generate: base vs tuned", self.generate_for_prompt, "", "comments")
        self.generated = widgets.HTML()
        self.shared.observe(self._on_event)
        self._fit_task()
        self.children = [self.forms[0].widget, widgets.HBox([self.evaluate_button, self.after_training]),
                         self.status, self.error, self.warnings, self.note, self.metrics, self.confusion,
                         self.margins, self.instruction, self.errors, self.samples, widgets.HTML("<b>your prompt</b>"),
                         widgets.HBox([self.prompt, self.generate_button]), self.generated]
        self.children = list(self.children) + self.playground()

    def _fit_task(self) -> None:
        """Only the picture the task has: a confusion matrix for labels, the margins for pairs."""
        pairs = self.shared.get("data.task") == "preference"
        self.confusion.layout.display = "none" if pairs else ""
        self.margins.layout.display = "" if pairs else "none"

    def _on_event(self, event: str) -> None:
        if event == "config":
            self._fit_task()
        # Runs on the thread that finished training: the test stays off the main thread too.
        if event == "train" and self.after_training.value:
            self.run_action(self.evaluate_button, self.evaluate)

    def evaluate(self) -> None:
        session = self.session()  # while a run holds it, the session is used as it is
        trained = session.train_result is not None
        self.note.value = "" if trained else message_html(
            "no training run yet: the 'tuned' model is the base with fresh (zero) adapters", "warning")
        result = session.evaluate()
        session.write_outputs()
        self.show(result)
        stopped = trained and session.train_result.stopped
        rows = "pairs" if "preference_accuracy" in result.metrics else "rows"
        self.say(f"evaluated on {len(result.predictions):,} test {rows}"
                 + (f" (training was stopped at step {session.train_result.global_step})" if stopped else ""))
        self.shared.notify("eval")

    def show(self, result: evaluation.EvalResult) -> None:
        pairs = "preference_accuracy" in result.metrics
        if pairs:
            self.metrics.value = ("<b>held-out pairs: tuned against base</b> (a model prefers the chosen answer when "
                                  "it gives it the higher log-probability; margin: log p(chosen) - log p(rejected))"
                                  + tables.table_html(tables.preference_metrics(result.metrics), index=True))
        else:
            self.metrics.value = "<b>test metrics</b>" + tables.table_html(result.metrics, index=True)
        if result.confusion is not None:
            self.confusion.show(figures.confusion_figure(result.confusion))
        else:
            self.confusion.clear()
        if pairs and "base_margin" in result.predictions:
            self.margins.show(figures.pair_margins_figure(result.predictions))
        else:
            self.margins.clear()
        shown = len(result.errors) or len(result.samples)
        self.instruction.value = instruction(result.instruction) if shown else ""
        heading = ("<b>pairs the tuned model gets most wrong</b> (lowest margin first)" if pairs else
                   "<b>worst errors</b> (most confident first)")
        self.errors.value = heading + tables.table_html(result.errors) if len(result.errors) else ""
        reference = " (reference: the chosen answer)" if pairs else ""
        self.samples.value = (f"<b>samples</b>: base and tuned side by side{reference}"
                              + tables.table_html(result.samples) if len(result.samples) else "")

    def generate_for_prompt(self) -> None:
        text = self.prompt.value.strip()
        if not text:
            self.show_error("type a prompt first")
            return
        session = self.shared.current
        if session is None or session.model is None:
            self.show_error("no model yet: train one (or press Evaluate) first")
            return
        cfg = session.cfg
        self.say("generating with the base and the tuned model")
        out = evaluation.compare_prompt(session.model, session.formatter, text, session.prep.task,
                                        cfg.eval.max_new_tokens, session.precision)
        self.generated.value = tables.table_html(pd.DataFrame([out]))
        self.say("")

    def playground(self) -> list:
        """The chat playground's widgets: message, Send and Stop, sampling controls, two answers."""
        self.message = widgets.Text(placeholder="chat: type a message and press Send",
                                    layout=widgets.Layout(width="420px"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.send_button.on_click(lambda b: self.chat())
        self.message.add_class("nbft-chat-message")
        self.send_button.add_class("nbft-chat-send")
        self.stop_chat = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.stop_chat.on_click(lambda b: self._chat_stop.set())
        self._chat_stop = threading.Event()
        self.temperature = widgets.FloatSlider(value=0.7, min=0.0, max=1.5, step=0.05, description="temperature")
        self.top_p = widgets.FloatSlider(value=0.9, min=0.05, max=1.0, step=0.05, description="top-p")
        self.max_new = widgets.IntSlider(value=128, min=8, max=1024, step=8, description="max new tokens")
        self.answers = {name: self.answer_box(name) for name in ("base", "tuned")}
        # As in a chat window, the answers sit above the message box: whoever sees where to type
        # sees both answers. Their boxes have a fixed height, so a growing answer scrolls inside
        # its box and moves nothing on the page while it streams.
        return [widgets.HTML("<b>chat playground</b>: base and tuned answers, streamed"),
                widgets.HBox([self.answers["base"], self.answers["tuned"]]),
                widgets.HBox([self.message, self.send_button, self.stop_chat]),
                widgets.HBox([self.temperature, self.top_p, self.max_new])]

    @staticmethod
    def answer_box(name: str) -> widgets.HTML:
        # A Layout each: one shared Layout is hidden with either box. A fixed `height` lets the
        # panel's flex column shrink the boxes to nothing; equal min and max heights hold.
        box = widgets.HTML(f"<b>{name}</b>", layout=widgets.Layout(width="50%", min_height="12em", max_height="12em",
                                                                   overflow="auto", border="1px solid #ddd",
                                                                   padding="4px", margin="2px"))
        box.add_class(f"nbft-chat-{name}")
        return box

    def chat(self) -> threading.Thread | None:
        """Send: in the foreground, or on a thread that it returns."""
        self._chat_stop.clear()
        if self.foreground:
            self.run_action(self.send_button, self.stream_both)
            return None
        self.send_button.disabled = True  # before the thread starts, so a second click cannot slip in
        worker = threading.Thread(target=self.run_action, args=(self.send_button, self.stream_both),
                                  name="nb_finetune-playground", daemon=True)
        worker.start()
        return worker

    def stream_both(self) -> None:
        """The base's answer, then the tuned model's, each shown as its pieces arrive."""
        session = self.shared.current
        if session is None or session.model is None:
            self.show_error("no model yet: train one (or press Evaluate) first")
            return
        if not self.message.value.strip():
            self.show_error("type a message first")
            return
        sampling = evaluation.Sampling(self.temperature.value, self.top_p.value, self.max_new.value)
        self.stop_chat.disabled = self.foreground
        for name, box in self.answers.items():
            box.value = f"<b>{name}</b>"  # the last message's answers go, so none is mistaken for this one's
        try:
            for name in ("base", "tuned"):
                text = ""
                for piece in evaluation.stream_reply(session.model, session.tokenizer, self.message.value,
                                                     name == "tuned", sampling, self._chat_stop):
                    text += piece
                    self.answers[name].value = f"<b>{name}</b><br>{html.escape(text)}"
        finally:
            self.stop_chat.disabled = True
        self.say("stopped" if self._chat_stop.is_set() else "")
