"""Model and hyperparameters: the base, LoRA/QLoRA and the optimizer, with trainable
parameters and a memory estimate shown before anything is loaded."""
from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

from .. import assets, hardware, memory, modeling
from ..config import TrainConfig
from ..render import figures
from ..training import trackers
from .common import Form, Panel, Picture

MODEL_KEYS = ["model.name", "model.objective", "model.compute_dtype", "model.trust_remote_code",
              "model.allow_pickle"]
LORA_KEYS = ["model.lora_r", "model.lora_alpha", "model.lora_dropout", "model.target_modules"]
QUANT_KEYS = ["model.quantization", "model.quant_type", "model.double_quant"]
TRAIN_KEYS = ["train.learning_rate", "train.batch_size", "train.grad_accum", "train.effective_batch",
              "train.epochs", "train.max_steps", "train.weight_decay", "train.warmup_ratio", "train.scheduler",
              "train.optimizer", "train.gradient_checkpointing", "train.max_length", "train.seed"]
RUN_KEYS = ["train.output_dir", "train.eval_steps", "train.logging_steps", "train.save_steps",
            "train.early_stopping_patience", "train.resume_from", "train.report_to"]


def _cheap_to_inspect(name: str) -> bool:
    """Whether reading the model's config needs no download (built-in and cached, or a folder)."""
    return assets.is_cached(name) if name in assets.BUILTIN else Path(name).is_dir()


class ModelPanel(Panel):
    title = "Model"

    def __init__(self, shared=None, config=None, data=None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        models = [a["name"] for a in assets.listing() if a["kind"] == "model"]
        self.forms = [Form(self.shared, MODEL_KEYS, suggestions={"model.name": models}),
                      Form(self.shared, LORA_KEYS), Form(self.shared, QUANT_KEYS),
                      Form(self.shared, TRAIN_KEYS), Form(self.shared, RUN_KEYS)]
        self._disable_what_cannot_work()
        self.hardware = widgets.HTML(f"<b>hardware</b>: {hardware.summary()}")
        self.estimate_button = self.button("Estimate memory", self.estimate, "", "calculator")
        self.estimate_text = widgets.HTML()
        self.memory_image = Picture("The memory estimate appears here once you press Estimate memory.")
        sections = widgets.Accordion(children=[f.widget for f in self.forms])
        for i, name in enumerate(["model", "LoRA", "quantization (QLoRA)", "training",
                                  "run: output, validation, checkpoints"]):
            sections.set_title(i, name)
        sections.selected_index = 1
        self._estimated = False
        self.shared.observe(self._on_event)
        self.children = [self.hardware, sections, widgets.HBox([self.estimate_button]), self.status,
                         self.error, self.warnings, self.estimate_text, self.memory_image]
        if _cheap_to_inspect(self.shared.get("model.name")):
            self.run_action(None, self.estimate)

    def _disable_what_cannot_work(self) -> None:
        ok, why = hardware.bitsandbytes_available()
        quant = self.forms[2]
        if not ok:
            for key in QUANT_KEYS:
                quant.disable(key, why)
        dtype = self.forms[0].controls["model.compute_dtype"]
        policy = hardware.precision()
        if not policy.bf16_allowed:
            dtype.options = [o for o in dtype.options if o != "bfloat16"]
            self.forms[0].notes["model.compute_dtype"].value = f"<span style='color:#666'>{policy.reason}</span>"
        self._note_absent_trackers()

    def _note_absent_trackers(self) -> None:
        """A tracker without its package stays a choice (a loaded config may name it, and training
        then says what to install); the note says so beforehand."""
        hints = [f"{name}: {hint}" for name in trackers.NEEDS
                 if (hint := trackers.install_hint(TrainConfig(report_to=name)))]
        if hints:
            note = f"not installed here: {'; '.join(hints)}"
            self.forms[4].notes["train.report_to"].value = f"<span style='color:#666'>{note}</span>"

    def _on_event(self, event: str) -> None:
        if event in ("config", "data") and self._estimated:
            self.run_action(None, self.estimate)

    def estimate(self) -> None:
        cfg = self.shared.config()
        model_config = modeling.load_config(cfg.model, self.say)
        objective = modeling.objective_for(cfg.model, model_config)
        prep = self.shared.current.prep if self.shared.current else None
        labels = len(prep.labels) if prep is not None and prep.labels else 2
        est = memory.estimate(cfg, objective, labels)
        available = hardware.device_memory()
        share = est.trainable / max(est.total_params, 1)
        fits = "fits" if est.total < available else "<b style='color:#b00020'>does not fit</b>"
        self.estimate_text.value = (
            f"<b>{cfg.model.name}</b> ({objective}): {est.total_params:,} parameters, "
            f"<b>{est.trainable:,} trainable</b> ({share:.2%}); memory estimate "
            f"<b>{est.total / 2**30:.2f} GiB</b> on {est.device}, {fits} in {available / 2**30:.0f} GiB")
        self.memory_image.show(figures.memory_figure(est.parts, available))
        self.say("estimated from the model's config alone; nothing was loaded")
        self._estimated = True
