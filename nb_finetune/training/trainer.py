"""The transformers Trainer underneath: a subclass that computes logits only where a token is
trained, the bridge from its events to ours, and which checkpoint a run resumes from."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..data.collator import trained_positions
from ..data.formatter import IGNORE
from .sampler import ShuffledLengthGroupedSampler

HISTORY_COLUMNS = ["step", "epoch", "train_loss", "val_loss", "val_accuracy", "learning_rate",
                   "tokens_per_second"]
# tokens/s is counted over the last this many optimizer steps: steps of different lengths run at
# different speeds, so the rate of one log's few steps follows their lengths, not the machine.
RATE_WINDOW_STEPS = 20


class EventBridge(TrainerCallback):
    """Turns Trainer events into engine events (see progress.Callback) and keeps the history;
    stops at the stop flag, on early stopping, and on a loss that is not a number."""

    def __init__(self, callbacks, stop, patience: int, info: dict):
        self.callbacks, self.stop, self.patience, self.info = callbacks, stop, patience, info
        self.rows: dict[int, dict] = {}
        self.best, self.bad_evals, self.early_stopped = float("inf"), 0, False
        self.stopped = False
        self.nonfinite = None  # (step, loss) where the loss stopped being a number
        self.marks: list[tuple[int, float, int]] = []  # (step, time, tokens seen) at the start and each log

    @property
    def history(self) -> pd.DataFrame:
        extra = list(dict.fromkeys(k for row in self.rows.values() for k in row if k not in HISTORY_COLUMNS))
        return pd.DataFrame(list(self.rows.values()), columns=HISTORY_COLUMNS + extra)

    def row(self, state) -> dict:
        return self.rows.setdefault(state.global_step, {c: np.nan for c in HISTORY_COLUMNS}
                                    | {"step": state.global_step})

    @staticmethod
    def extras(logs: dict, prefix: str, to: str) -> dict:
        """A preference run's rewards and margins (training.preference_trainer) under their
        history names: `prefix`+name in the logs becomes `to`+name."""
        return {to + k[len(prefix):]: v for k, v in logs.items()
                if k.startswith(prefix + "reward_") or k.startswith(prefix + "logp_")}

    def on_train_begin(self, args, state, control, **kw):
        self.marks = [(state.global_step, time.perf_counter(), state.num_input_tokens_seen)]
        for cb in self.callbacks:
            cb.on_train_begin(self.info | {"max_steps": state.max_steps})

    def check_stop(self, control) -> None:
        # Under several processes a stop asked for on any one of them stops them all at this step.
        if distributed.any_process(self.stop is not None and self.stop.is_set()):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # keep what was trained

    def on_step_end(self, args, state, control, **kw):
        self.check_stop(control)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs:
            return
        if not math.isfinite(logs["loss"]):
            # The weights are already broken by this step: stop, and do not save them.
            self.nonfinite = (state.global_step, logs["loss"])
            control.should_training_stop = True
            control.should_save = False
            return
        row = self.row(state)
        row.update(epoch=state.epoch, train_loss=logs["loss"], learning_rate=logs.get("learning_rate", np.nan),
                   tokens_per_second=self.tokens_per_second(state.global_step, state.num_input_tokens_seen))
        row.update(self.extras(logs, "", ""))
        for cb in self.callbacks:
            cb.on_log(dict(row), self.history)
        self.check_stop(control)  # a stop asked for while logging saves this very step

    def tokens_per_second(self, step: int, tokens: int) -> float:
        """Tokens trained over the last RATE_WINDOW_STEPS steps (or since the start), per second:
        tokens counted over time taken, not an average of the logs' rates."""
        now = time.perf_counter()
        # The latest mark at least a window back, else the first one.
        start = next((m for m in reversed(self.marks) if m[0] <= step - RATE_WINDOW_STEPS), self.marks[0])
        self.marks = [m for m in self.marks if m[0] >= start[0]] + [(step, now, tokens)]
        return (tokens - start[2]) / max(now - start[1], 1e-9)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics = metrics or {}
        row = self.row(state)
        row.update(epoch=state.epoch, val_loss=metrics.get("eval_loss", np.nan),
                   val_accuracy=metrics.get("eval_accuracy", np.nan))
        row.update(self.extras(metrics, "eval_", "val_"))
        if self.patience and self.no_better(row["val_loss"]):
            self.early_stopped = True
            control.should_training_stop = True
            control.should_save = True
        for cb in self.callbacks:
            cb.on_evaluate(dict(row), self.history)
        self.check_stop(control)  # a stop asked for on seeing this validation ends the run at this step

    def no_better(self, loss: float) -> bool:
        """Whether `patience` validations in a row have not lowered the best loss."""
        if loss < self.best - 1e-4:
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience


def token_accuracy(eval_pred) -> dict:
    """Share of trained tokens the model predicts right (argmax), or of rows for a head."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if labels.ndim == 1:  # classification head: preds are class ids
        return {"accuracy": float((preds == labels).mean())}
    # Causal LM: the prediction at position t is for the token at t + 1.
    preds, labels = preds[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else float("nan")}


def predicted_ids(logits, labels):
    """The predicted token ids, batch x length, for `token_accuracy`."""
    if isinstance(logits, tuple):
        logits = logits[0]
    # The fused loss hands on token ids (SafeTrainer's `predicted_ids` output), not logits.
    preds = logits.argmax(dim=-1) if logits.is_floating_point() else logits
    if preds.dim() == 1 and labels is not None and labels.dim() == 2:
        # Predictions came only for the positions that predict a trained token (SafeTrainer):
        # put them back in place; the other positions are never compared.
        keep, _ = trained_positions(labels)
        full = torch.full_like(labels, IGNORE)
        full[keep] = preds
        return full
    return preds


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` in `folder`. The Trainer writes a checkpoint's
    trainer_state.json last, after the weights, optimizer and RNG states: a folder without it
    is one a process was killed while writing, and resuming from it would fail or be wrong."""
    found = {}
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if Path(folder).is_dir() else ():
        step = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if step and (path / TRAINER_STATE_NAME).is_file():
            found[int(step.group(1))] = path
    return found[max(found)] if found else None


class SafeTrainer(Trainer):
    """Checkpoints are the Trainer's own; `last_checkpoint` tells a complete one.

    Packed rows (train.packing) and padding-free batches (train.padding_free) reach the model
    with position_ids and no attention mask.

    With `trained_logits_only`, training computes the vocabulary projection and the loss at
    the positions that predict a trained token only. The prompt's positions have no loss, so
    their logits were work thrown away. The loss and gradients are the same
    (tests/training/test_trainer.py). Validation does the same: its loss and its token
    accuracy look at those positions only (`predicted_ids` puts the predictions back in place).

    With `fused_loss` (kernels.loss.FusedCausalLMLoss, from the CPU kernels), the projection
    and the loss are computed together, a few rows at a time, and the logits are never stored.
    Validation gets each trained position's predicted token from the same chunks, in place of
    logits. The loss is scaled as Trainer.compute_loss scales a model's own (`across_processes`),
    and the Trainer's accumulation treats it as it treats the model's."""
    trained_logits_only = False
    fused_loss = None
    train_collator = None  # the training batches' own collator (padding-free, counting), where set
    shuffle_length_groups = True  # False: transformers' own order, each megabatch longest to shortest

    def _get_train_sampler(self, train_dataset=None):
        """Rows grouped by length as `group_by_length` groups them, the steps in random order
        (sampler.shuffled_length_groups)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not (self.shuffle_length_groups and self.args.train_sampling_strategy == "group_by_length"
                and dataset is not None and hasattr(dataset, "__len__")):
            return super()._get_train_sampler(train_dataset)
        lengths = [len(row["input_ids"]) for row in dataset]
        return ShuffledLengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps)

    def get_train_dataloader(self):
        """The training batches from `train_collator` where one is set; validation keeps the
        shared `data_collator`."""
        shared = self.data_collator
        self.data_collator = self.train_collator or shared
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "position_ids" in inputs:
            # Packed or flattened rows (data.tokens.pack, CompletionOnlyCollator.flattened): without an
            # attention mask and a cache, transformers keeps each original row's attention to itself
            # from the position_ids (training.policy.PACKED_ATTENTION). The mask has served to count tokens.
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"} | {"use_cache": False}
        labels = inputs.get("labels")
        if not (self.trained_logits_only and labels is not None and labels.dim() == 2):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        keep, following = trained_positions(labels)
        inputs = {**inputs, "logits_to_keep": keep, "shift_labels": following}
        if self.fused_loss is None or not (model.training or not torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model's own loss takes num_items_in_batch where it accepts loss arguments; so does this one.
        loss = self.fused_loss(model, inputs, keep, following,
                               num_items_in_batch if self.model_accepts_loss_kwargs else None)
        loss = self.across_processes(loss, num_items_in_batch)
        if not return_outputs:
            return loss
        # A pass without gradients (validation) predicted the tokens: hand those on, not logits.
        predictions = self.fused_loss.predictions
        return loss, {} if predictions is None else {"predicted_ids": predictions}

    def across_processes(self, loss, num_items_in_batch):
        """What Trainer.compute_loss does to a model's loss over the tokens of all processes:
        scaled by the process count, as the gradients are averaged across them."""
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def save_checkpoint_now(self) -> bool:
        """A checkpoint of the steps trained so far (after an interrupt), written as the Trainer
        writes its own. The Trainer has no public call for it: False where this transformers
        lacks the private one (the adapter is still saved when training ends)."""
        save = getattr(super(), "_save_checkpoint", None)
        if save is None:
            return False
        save(self.model, trial=None)
        return True

    def drop_printers(self) -> None:
        """Nothing prints from the training loop: events go to our callbacks instead. Matched by
        name: importing transformers' notebook callback needs IPython, which a headless run lacks."""
        for printer in [cb for cb in self.callback_handler.callbacks
                        if type(cb).__name__ in ("PrinterCallback", "ProgressCallback", "NotebookProgressCallback")]:
            self.remove_callback(printer)
