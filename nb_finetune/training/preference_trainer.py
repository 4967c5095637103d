"""The Trainer for preference pairs (train.method 'dpo' or 'orpo'): the loss from
training.preference, and its rewards, margins and accuracy logged beside the loss."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .preference import PreferenceLoss
from .trainer import SafeTrainer


class PreferenceTrainer(SafeTrainer):
    """SafeTrainer with `PreferenceLoss` in place of the causal-LM loss.

    The loss is a mean over the batch's pairs, so the Trainer divides it by the accumulation
    steps itself (`model_accepts_loss_kwargs` off: a count of trained tokens means nothing here).
    Validation gives the preference loss, and as `eval_accuracy` the share of pairs whose chosen
    answer gets the higher reward: the history's val_accuracy."""

    def __init__(self, *args, preference: PreferenceLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.model_accepts_loss_kwargs = False
        self.pair_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.preference(model, inputs, self.fused_loss, self.accelerator.unwrap_model(model))
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self.pair_metrics[mode][key].append(value)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the means since the last log; in place, since the Trainer hands the same dict
        of validation metrics on to the callbacks' on_evaluate."""
        mode, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        gathered = self.pair_metrics[mode]
        logs.update({prefix + key: float(np.mean(values)) for key, values in gathered.items() if values})
        if mode == "eval" and gathered.get("reward_accuracy"):
            logs["eval_accuracy"] = logs["eval_reward_accuracy"]
        gathered.clear()
        super().log(logs, *args, **kwargs)
