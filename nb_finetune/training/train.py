"""Training: transformers `Trainer` underneath, events out, a history DataFrame kept.

The engine imports no widgets. Whoever watches (the console, a panel, a test) passes
`Callback` objects and gets `on_train_begin`, `on_log`, `on_evaluate` and `on_train_end`
with plain dicts. A `threading.Event` passed as `stop` ends training after the current
step; what was trained is kept (a checkpoint and the history).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pandas as pd

from .. import distributed, kernels
from ..config import PREFERENCE_METHODS, TrainConfig
from ..data.collator import PaddingTally, per_token
from ..errors import UserError
from ..modeling import keeps_logits_selectively
from . import trackers
from .diagnosis import diagnose
from .policy import (
    accumulation,
    check_disk,
    is_gpu_oom,
    is_oom,
    nonfinite_advice,
    oom_advice,
    oom_rescue,
    training_arguments,
    use_liger,
    use_padding_free,
)
from .preference import PreferenceLoss
from .preference_trainer import PreferenceTrainer
from .trainer import EventBridge, SafeTrainer, last_checkpoint, predicted_ids, token_accuracy


@dataclass
class TrainResult:
    history: pd.DataFrame
    stopped: bool            # by the stop flag
    early_stopped: bool      # by early stopping on validation loss
    adapter_dir: Path
    last_checkpoint: Path | None
    global_step: int
    seconds: float
    padding: PaddingTally = field(default_factory=PaddingTally)  # the training batches' padding

    def _repr_html_(self) -> str:
        from ..render import html
        return html.train_result(self, diagnose(self.history))

    def _repr_pretty_(self, p, cycle) -> None:
        from ..render import html
        p.text(html.train_result_text(self, diagnose(self.history)))


@dataclass(frozen=True)
class Setup:
    """How a run computes, decided once before its first try."""
    precision: str
    quantized: bool = False  # the base is 4- or 8-bit
    liger: bool = False  # Liger Kernel's layers and loss (policy.use_liger)
    padding_free: bool = False  # training batches flattened into one row (policy.use_padding_free)


@dataclass
class TrainTarget:
    """What a run trains: the model (already with adapters), its rows, how they are batched,
    and how the model computes. The tokenizer, where given, is saved beside the adapter."""
    model: object
    train_ds: object
    val_ds: object = None
    collator: object = None
    tokenizer: object = None
    precision: str = "float32"
    quantized: bool = False  # the base is 4- or 8-bit


@dataclass
class Watch:
    """Who hears of a run and how it is stopped: `callbacks` get its events, `stop` ends it
    after the current step, `info` is added to the begin event, and `say` gets a line for each
    speed-up used or refused and each change made to rescue a run that ran out of GPU memory."""
    callbacks: Sequence = ()
    stop: threading.Event | None = None
    info: dict = field(default_factory=dict)
    say: Callable[[str], None] = lambda line: None


def train(target: TrainTarget, cfg: TrainConfig, watch: Watch | None = None) -> TrainResult:
    """Train `target.model` and save its adapter under cfg.output_dir/adapter. The history is
    written to cfg.output_dir/history.csv however training ends. The tracker's packages are the
    caller's to check (trackers.check), before the model loads."""
    watch = watch or Watch()
    check_disk(target.model, cfg)
    # Only the main process reports: one console, one history, one set of files.
    callbacks = list(watch.callbacks) if distributed.is_main() else []
    bridge = EventBridge(callbacks, watch.stop, cfg.early_stopping_patience, dict(watch.info))
    setup = decide_setup(target, cfg, watch.say)
    bridge.info.update(liger_kernel=setup.liger, padding_free=setup.padding_free)
    start = time.perf_counter()
    try:
        trainer = train_with_rescue(target, cfg, setup, bridge, watch.say)
    finally:
        write_history(bridge.history, cfg)
        without_autocast(target.model)
    return finish(trainer, bridge, cfg, target, time.perf_counter() - start)


def without_autocast(model) -> None:
    """Take off the autocast that mixed precision wrapped the model's forward in (each try of a
    rescued run keeps it): what runs on the model next (evaluation, probes, the playground)
    asks for its own precision."""
    from accelerate.utils import extract_model_from_parallel
    extract_model_from_parallel(model, keep_fp32_wrapper=False)


def decide_setup(target: TrainTarget, cfg: TrainConfig, say) -> Setup:
    """The speed-ups this run uses (Liger Kernel, padding-free batches), each said when used or refused."""
    if cfg.method in PREFERENCE_METHODS:
        return preference_setup(cfg, target.precision, target.quantized, say)
    model, rows = target.model, target.train_ds
    liger, liger_note = use_liger(cfg, getattr(getattr(model, "config", None), "model_type", ""))
    causal_lm = len(rows) == 0 or per_token([rows[0]])
    padding_free, padding_note = use_padding_free(cfg, model, causal_lm)
    for note in (liger_note, padding_note):
        if note:
            say(note)
    return Setup(target.precision, target.quantized, liger, padding_free)


def preference_setup(cfg: TrainConfig, precision: str, quantized: bool, say) -> Setup:
    """Pairs train padded, with transformers' layers: each side is a row of its own, and the
    log-probabilities need the positions Liger's fused loss does not hand out."""
    for name in ("liger_kernel", "padding_free"):
        if getattr(cfg, name) == "on":
            say(f"train.{name}: on does not apply to train.method={cfg.method!r}; training without it")
    return Setup(precision, quantized)


def train_with_rescue(target: TrainTarget, cfg: TrainConfig, setup: Setup, bridge: EventBridge,
                      say) -> SafeTrainer:
    """Train; on running out of GPU memory before the first optimizer step, try again smaller
    (policy.oom_rescue) until it fits or nothing is left to try."""
    while True:
        trainer = make_trainer(target, cfg, setup, bridge)
        try:
            run(trainer, target.model, cfg, setup.precision, bridge, say)
            return trainer
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            # Past the first optimizer step the weights have moved: a restart would not be the same run.
            rescue = oom_rescue(cfg, setup.quantized) if is_gpu_oom(err) and trainer.state.global_step == 0 else None
            if rescue is None:
                if is_oom(err):
                    raise UserError(oom_advice(cfg)) from None
                raise
        cfg, line = rescue
        say(line)
        bridge.info.update(batch_size=cfg.batch_size, grad_accum=accumulation(cfg),
                           rescues=[*bridge.info.get("rescues", []), line])
        trainer.optimizer = trainer.lr_scheduler = trainer = None  # the failed try's last references
        release(target.model)


def run(trainer: SafeTrainer, model, cfg: TrainConfig, precision: str, bridge: EventBridge, say) -> None:
    try:
        with kernels.for_training(model, precision, kernels.wanted(cfg.cpu_kernels)) as applied, \
                trackers.mlflow_store(cfg):
            trainer.fused_loss = applied.fused_loss if trainer.trained_logits_only else None
            bridge.info["kernels"] = applied.describe()
            trainer.train(resume_from_checkpoint=resume_point(cfg, trainer.args.output_dir))
    except KeyboardInterrupt:
        # A kernel interrupt (or a second Ctrl-C) is a stop too: keep what the finished steps trained.
        bridge.stopped = True
        if trainer.state.global_step > 0 and not trainer.save_checkpoint_now():
            say(f"transformers {metadata.version('transformers')} has no Trainer._save_checkpoint: the "
                f"interrupted run keeps its adapter, and resumes from its last periodic checkpoint")


def release(model) -> None:
    """Give back what a failed try held (gradients, optimizer state, cached blocks) before the next."""
    import gc

    import torch
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_trainer(target: TrainTarget, cfg: TrainConfig, setup: Setup, bridge: EventBridge) -> SafeTrainer:
    val_ds, collator = target.val_ds, target.collator
    args = training_arguments(cfg, setup.precision, has_eval=val_ds is not None and len(val_ds) > 0,
                              quantized=setup.quantized, liger=setup.liger)
    common = dict(model=target.model, args=args, train_dataset=target.train_ds, data_collator=collator,
                  callbacks=[bridge], eval_dataset=val_ds if args.eval_strategy != "no" else None)
    if cfg.method in PREFERENCE_METHODS:
        trainer = PreferenceTrainer(**common, preference=PreferenceLoss(cfg.method, cfg.beta, cfg.dpo_loss))
    else:
        trainer = SafeTrainer(**common, compute_metrics=token_accuracy, preprocess_logits_for_metrics=predicted_ids)
    # Liger's fused linear + cross-entropy keeps no logits already, and its forward takes
    # `logits_to_keep` as a count or slice, not our mask of positions.
    trainer.trained_logits_only = keeps_logits_selectively(target.model) and not setup.liger
    # Each try counts its own training batches; validation batches stay padded.
    trainer.train_collator = replace(collator, flatten=setup.padding_free, tally=PaddingTally())
    trainer.drop_printers()
    trackers.point_tensorboard(trainer, cfg)
    return trainer


def resume_point(cfg: TrainConfig, checkpoints: str) -> str | None:
    if cfg.resume_from == "last":
        last = last_checkpoint(checkpoints)
        return None if last is None else str(last)
    return cfg.resume_from or None


def write_history(history: pd.DataFrame, cfg: TrainConfig) -> None:
    if distributed.is_main():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        history.to_csv(Path(cfg.output_dir) / "history.csv", index=False)


def finish(trainer: SafeTrainer, bridge: EventBridge, cfg: TrainConfig, target: TrainTarget,
           seconds: float) -> TrainResult:
    """Refuse a run whose loss stopped being a number; else save the adapter and report the end.
    The model is handed back in eval mode: without a final validation pass the Trainer leaves
    dropout on, and a probe or the playground would then score a fresh dropout draw each time."""
    last = last_checkpoint(trainer.args.output_dir)
    if bridge.nonfinite:
        step, loss = bridge.nonfinite
        raise UserError(nonfinite_advice(step, loss, cfg, target.precision, last))
    trainer.model.eval()
    adapter_dir = Path(cfg.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))  # the Trainer writes on the main process only
    if target.tokenizer is not None and distributed.is_main():
        target.tokenizer.save_pretrained(str(adapter_dir))
    result = TrainResult(bridge.history, bridge.stopped, bridge.early_stopped, adapter_dir,
                         last, trainer.state.global_step, seconds, trainer.train_collator.tally)
    for cb in bridge.callbacks:
        cb.on_train_end(result)
    return result
