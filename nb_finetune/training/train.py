"""Training: transformers `Trainer` underneath, events out, a history DataFrame kept.

The engine imports no widgets. Whoever watches (the console, a panel, a test) passes
`Callback` objects and gets `on_train_begin`, `on_log`, `on_evaluate` and `on_train_end`
with plain dicts. A `threading.Event` passed as `stop` ends training after the current
step; what was trained is kept (a checkpoint and the history).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from transformers.trainer_utils import get_last_checkpoint

from .. import distributed, kernels
from ..config import TrainConfig
from ..errors import UserError
from ..modeling import keeps_logits_selectively
from .diagnosis import diagnose
from .policy import check_disk, is_oom, oom_advice, training_arguments
from .trainer import EventBridge, SafeTrainer, predicted_ids, token_accuracy


@dataclass
class TrainResult:
    history: pd.DataFrame
    stopped: bool            # by the stop flag
    early_stopped: bool      # by early stopping on validation loss
    adapter_dir: Path
    last_checkpoint: Path | None
    global_step: int
    seconds: float

    def _repr_html_(self) -> str:
        from ..render import html
        return html.train_result(self, diagnose(self.history))

    def _repr_pretty_(self, p, cycle) -> None:
        from ..render import html
        p.text(html.train_result_text(self, diagnose(self.history)))


def train(model, train_ds, val_ds, collator, cfg: TrainConfig, callbacks=(), stop: threading.Event | None = None,
          precision: str = "float32", tokenizer=None, info: dict | None = None, quantized: bool = False
          ) -> TrainResult:
    """Train `model` (already with adapters) and save its adapter under cfg.output_dir/adapter.
    The history is written to cfg.output_dir/history.csv however training ends."""
    check_disk(model, cfg)
    # Only the main process reports: one console, one history, one set of files.
    callbacks = list(callbacks) if distributed.is_main() else []
    bridge = EventBridge(callbacks, stop, cfg.early_stopping_patience, dict(info or {}))
    trainer = make_trainer(model, train_ds, val_ds, collator, cfg, precision, quantized, bridge)
    start = time.perf_counter()
    try:
        with kernels.for_training(model, precision, kernels.wanted(cfg.cpu_kernels)) as applied:
            trainer.fused_loss = applied.fused_loss if trainer.trained_logits_only else None
            bridge.info["kernels"] = applied.describe()
            trainer.train(resume_from_checkpoint=resume_point(cfg, trainer.args.output_dir))
    except KeyboardInterrupt:
        # A kernel interrupt (or a second Ctrl-C) is a stop too: keep what the finished steps trained.
        bridge.stopped = True
        if trainer.state.global_step > 0:
            trainer.save_checkpoint_now()
    except RuntimeError as err:
        if is_oom(err):
            raise UserError(oom_advice(cfg)) from None
        raise
    finally:
        write_history(bridge.history, cfg)
    return finish(trainer, bridge, cfg, tokenizer, callbacks, time.perf_counter() - start)


def make_trainer(model, train_ds, val_ds, collator, cfg: TrainConfig, precision: str, quantized: bool,
                 bridge: EventBridge) -> SafeTrainer:
    args = training_arguments(cfg, precision, has_eval=val_ds is not None and len(val_ds) > 0, quantized=quantized)
    trainer = SafeTrainer(model=model, args=args, train_dataset=train_ds,
                          eval_dataset=val_ds if args.eval_strategy != "no" else None,
                          data_collator=collator, callbacks=[bridge], compute_metrics=token_accuracy,
                          preprocess_logits_for_metrics=predicted_ids)
    trainer.trained_logits_only = keeps_logits_selectively(model)
    trainer.drop_printers()
    return trainer


def resume_point(cfg: TrainConfig, checkpoints: str) -> str | None:
    if cfg.resume_from == "last":
        return get_last_checkpoint(checkpoints) if Path(checkpoints).is_dir() else None
    return cfg.resume_from or None


def write_history(history: pd.DataFrame, cfg: TrainConfig) -> None:
    if distributed.is_main():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        history.to_csv(Path(cfg.output_dir) / "history.csv", index=False)


def finish(trainer: SafeTrainer, bridge: EventBridge, cfg: TrainConfig, tokenizer, callbacks, seconds: float
           ) -> TrainResult:
    """Refuse a run whose loss stopped being a number; else save the adapter and report the end."""
    checkpoints = trainer.args.output_dir
    last = get_last_checkpoint(checkpoints) if Path(checkpoints).is_dir() else None
    if bridge.nonfinite:
        step, loss = bridge.nonfinite
        raise UserError(f"the training loss became {loss} at step {step}; likely causes: a learning rate too "
                        f"high (train.learning_rate={cfg.learning_rate:g}: try a tenth of it) or fp16 overflow "
                        "(use bf16 or fp32); the last good checkpoint is "
                        f"{last or 'none (no checkpoint was saved before it)'}")
    adapter_dir = Path(cfg.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))  # the Trainer writes on the main process only
    if tokenizer is not None and distributed.is_main():
        tokenizer.save_pretrained(str(adapter_dir))
    result = TrainResult(bridge.history, bridge.stopped, bridge.early_stopped, adapter_dir,
                         Path(last) if last else None, trainer.state.global_step, seconds)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
