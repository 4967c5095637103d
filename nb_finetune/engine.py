"""Training: transformers `Trainer` underneath, events out, a history DataFrame kept.

The engine imports no widgets. Whoever watches (the console, a panel, a test) passes
`Callback` objects and gets `on_train_begin`, `on_log`, `on_evaluate` and `on_train_end`
with plain dicts. A `threading.Event` passed as `stop` ends training after the current
step; what was trained is kept (a checkpoint and the history).
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import attention, distributed, hardware, memory
from .config import TrainConfig
from .errors import UserError
from .tokenization import IGNORE

HISTORY_COLUMNS = ["step", "epoch", "train_loss", "val_loss", "val_accuracy", "learning_rate",
                   "tokens_per_second"]


class Callback:
    """Receives the engine's events; override what you need. `info` and rows are plain dicts."""

    def on_train_begin(self, info: dict) -> None: ...

    def on_log(self, row: dict, history: pd.DataFrame) -> None: ...

    def on_evaluate(self, row: dict, history: pd.DataFrame) -> None: ...

    def on_train_end(self, result: "TrainResult") -> None: ...


class ConsoleProgress(Callback):
    """One line per log event, for the command line."""

    def __init__(self, print_fn=print):
        self.print = print_fn
        self.start = time.perf_counter()
        self.max_steps = 0

    def on_train_begin(self, info):
        self.start = time.perf_counter()
        self.max_steps = info["max_steps"]
        self.print(f"training: {info['max_steps']} steps, {info['train_rows']:,} rows, effective batch "
                   f"{info['effective_batch']} ({info['batch_size']} per process x {info['processes']} "
                   f"process(es) x {info['grad_accum']} accumulation), {info['trainable']:,} trainable parameters, "
                   f"precision {info['precision']}")

    def _line(self, row, text):
        elapsed = time.perf_counter() - self.start
        done = row["step"] / max(self.max_steps, 1)
        eta = elapsed * (1 - done) / done if done else float("nan")
        self.print(f"  step {row['step']:>4}/{self.max_steps}  {text}  "
                   f"elapsed {_clock(elapsed)}  eta {_clock(eta)}")

    def on_log(self, row, history):
        self._line(row, f"loss {row['train_loss']:.4f}  lr {row['learning_rate']:.2e}  "
                        f"{row['tokens_per_second']:,.0f} tok/s")

    def on_evaluate(self, row, history):
        acc = row.get("val_accuracy")
        self._line(row, f"val_loss {row['val_loss']:.4f}" + ("" if acc is None or math.isnan(acc)
                                                                else f"  val_acc {acc:.3f}"))


def diagnose(history: pd.DataFrame) -> str:
    """A plain-words reading of the curves so far: over-fitting, under-fitting or learning.

    Over-fitting: the last two validations rose above the best one while training loss kept
    falling. Under-fitting: after 10 logged steps and 3 validations, training loss is still
    above 80% of where it started and validation loss has not improved by 5%."""
    train = history["train_loss"].dropna() if len(history) else pd.Series(dtype=float)
    val = history.dropna(subset=["val_loss"]) if len(history) else history
    if len(train) < 3 and len(val) < 2:
        return "too early to tell: waiting for more steps"
    first = float(train.iloc[0]) if len(train) else float("nan")
    last = float(train.iloc[-1]) if len(train) else float("nan")
    if len(val) >= 3:
        losses, steps = val["val_loss"].to_numpy(), val["step"].to_numpy()
        best = int(np.argmin(losses))
        tail = train[history.loc[train.index, "step"] >= steps[best]]
        rising = best <= len(losses) - 3 and losses[-1] > losses[best] * 1.02 and losses[-1] >= losses[-2]
        if rising and len(tail) >= 2 and tail.iloc[-1] < tail.iloc[0]:
            return (f"over-fitting: validation loss is up from {losses[best]:.3f} at step {steps[best]} to "
                    f"{losses[-1]:.3f} while training loss keeps falling; stop here, train fewer epochs, use "
                    "early stopping (train.early_stopping_patience), more data or a smaller LoRA rank")
    if len(train) >= 10 and len(val) >= 3:
        val_gain = 1 - val["val_loss"].iloc[-1] / val["val_loss"].iloc[0]
        if last > 0.8 * first and val_gain < 0.05:
            return (f"under-fitting: training loss only went from {first:.3f} to {last:.3f} and validation loss "
                    "is flat; raise the learning rate, train longer or use a larger LoRA rank")
    if len(train) >= 2:
        text = f"learning: training loss {first:.3f} -> {last:.3f}"
        if len(val) >= 2:
            text += f", validation loss {val['val_loss'].iloc[0]:.3f} -> {val['val_loss'].iloc[-1]:.3f}"
        return text
    return "too early to tell: waiting for more steps"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


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
        from .display import train_result_html
        return train_result_html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        from .display import train_result_text
        p.text(train_result_text(self))


def _bridge_class():
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        """Turns Trainer events into engine events and keeps the history."""

        def __init__(self, callbacks, stop, patience, info):
            self.callbacks, self.stop, self.patience, self.info = callbacks, stop, patience, info
            self.rows: dict[int, dict] = {}
            self.best, self.bad_evals, self.early_stopped = float("inf"), 0, False
            self.stopped = False
            self.nonfinite = None  # (step, loss) where the loss stopped being a number
            self.last_time, self.last_tokens = None, 0

        @property
        def history(self) -> pd.DataFrame:
            return pd.DataFrame(list(self.rows.values()), columns=HISTORY_COLUMNS)

        def _row(self, state):
            return self.rows.setdefault(state.global_step, {c: np.nan for c in HISTORY_COLUMNS}
                                        | {"step": state.global_step})

        def on_train_begin(self, args, state, control, **kw):
            self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen
            for cb in self.callbacks:
                cb.on_train_begin(self.info | {"max_steps": state.max_steps})

        def _check_stop(self, control):
            # Under several processes a stop asked for on any one of them stops them all at this step.
            if distributed.any_process(self.stop is not None and self.stop.is_set()):
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True  # keep what was trained

        def on_step_end(self, args, state, control, **kw):
            self._check_stop(control)

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
            now = time.perf_counter()
            tokens = state.num_input_tokens_seen
            row = self._row(state)
            row.update(epoch=state.epoch, train_loss=logs["loss"], learning_rate=logs.get("learning_rate", np.nan),
                       tokens_per_second=(tokens - self.last_tokens) / max(now - self.last_time, 1e-9))
            self.last_time, self.last_tokens = now, tokens
            for cb in self.callbacks:
                cb.on_log(dict(row), self.history)
            self._check_stop(control)  # a stop asked for while logging saves this very step

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            metrics = metrics or {}
            row = self._row(state)
            row.update(epoch=state.epoch, val_loss=metrics.get("eval_loss", np.nan),
                       val_accuracy=metrics.get("eval_accuracy", np.nan))
            loss = row["val_loss"]
            if self.patience:
                if loss < self.best - 1e-4:
                    self.best, self.bad_evals = loss, 0
                else:
                    self.bad_evals += 1
                    if self.bad_evals >= self.patience:
                        self.early_stopped = True
                        control.should_training_stop = True
                        control.should_save = True
            for cb in self.callbacks:
                cb.on_evaluate(dict(row), self.history)

    return Bridge


def token_accuracy(eval_pred) -> dict:
    """Share of trained tokens the model predicts right (argmax), or of rows for a head."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if labels.ndim == 1:  # classification head: preds are class ids
        return {"accuracy": float((preds == labels).mean())}
    # Causal LM: the prediction at position t is for the token at t + 1.
    preds, labels = preds[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else float("nan")}


def _argmax_logits(logits, labels):
    """The predicted token ids, batch x length, for `token_accuracy`."""
    import torch
    if isinstance(logits, tuple):
        logits = logits[0]
    # Integer "logits" are token ids already: the chunked validation on a CPU predicts them
    # without keeping logits (SafeTrainer.fused_loss).
    preds = logits.argmax(dim=-1) if logits.is_floating_point() else logits
    if preds.dim() == 1 and labels is not None and labels.dim() == 2:
        # Logits came only for the positions that predict a trained token (SafeTrainer): put
        # them back in place; the other positions are never compared.
        keep, _ = trained_positions(labels)
        full = torch.full_like(labels, IGNORE)
        full[keep] = preds
        return full
    return preds


def accumulation(cfg: TrainConfig) -> int:
    """Forward passes per optimizer step, keeping train.effective_batch when it is set."""
    if not cfg.effective_batch:
        return cfg.grad_accum
    per_pass = cfg.batch_size * distributed.world_size()
    if cfg.effective_batch % per_pass:
        raise UserError(f"train.effective_batch={cfg.effective_batch} is not a multiple of batch_size "
                        f"{cfg.batch_size} x {distributed.world_size()} process(es) = {per_pass}; choose a multiple, "
                        "or another batch_size")
    return cfg.effective_batch // per_pass


def optimizer_and_checkpointing(cfg: TrainConfig, quantized: bool) -> tuple[str, bool]:
    """QLoRA on a GPU: paged 8-bit AdamW (optimizer state paged to CPU on memory spikes) and
    gradient checkpointing; otherwise torch's fused AdamW (one kernel over all the adapters'
    tensors: 5 ms a step against 26 ms for the multi-tensor one on SmolLM2's 420 adapter
    tensors on this CPU, the same updates to float rounding) and no recomputation."""
    qlora_gpu = quantized and hardware.cuda_available()
    optim = cfg.optimizer if cfg.optimizer != "auto" else ("paged_adamw_8bit" if qlora_gpu else "adamw_torch_fused")
    checkpointing = cfg.gradient_checkpointing == "yes" or (cfg.gradient_checkpointing == "auto" and qlora_gpu)
    return optim, checkpointing


def training_arguments(cfg: TrainConfig, precision: str, has_eval: bool, quantized: bool = False):
    from transformers import TrainingArguments
    save_steps = cfg.save_steps or cfg.eval_steps
    optim, checkpointing = optimizer_and_checkpointing(cfg, quantized)
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=accumulation(cfg), learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.scheduler,
        logging_steps=cfg.logging_steps, eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, bf16=precision == "bfloat16", fp16=precision == "float16",
        use_cpu=not hardware.cuda_available(), report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        train_sampling_strategy="group_by_length", remove_unused_columns=False,
        label_names=["labels"], optim=optim, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )


def trained_positions(labels):
    """For a causal LM batch: which positions predict a trained token (bool, batch x length),
    and those tokens in order. Position t predicts the token at t + 1."""
    import torch
    following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = following != IGNORE
    return keep, following[keep]


def keeps_logits_selectively(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@contextmanager
def frozen_weights_in(model, precision: str):
    """Hold the frozen weights of the adapted linear layers in `precision` while training, and
    let their adapters take the input in the dtype it comes in.

    Under bf16 autocast every linear layer casts its fp32 weight to bf16 on every forward
    pass (autocast caches only weights that are trained): a full copy of the model per step,
    about a tenth of a step on a CPU. Casting the frozen weights once gives the same bf16
    values, so the same results. The fp32 originals are put back afterwards, so evaluation
    and export see the weights as loaded.

    peft casts an adapter's input to the adapter's dtype (fp32) before its dropout and first
    matmul. Under autocast that matmul casts it straight back to bf16, so for an input that
    is already bf16 (the MLP's down projection takes the product of two adapted layers) the
    round trip is a pass over the activations each way for nothing: FastDropout computes the
    same values from the bf16 input (tests/test_speed.py)."""
    import torch
    from peft.helpers import disable_input_dtype_casting
    dtype = getattr(torch, precision)
    half = precision in ("bfloat16", "float16")
    originals = []
    if half:
        for module in model.modules():
            base = getattr(module, "base_layer", None)  # a LoRA-wrapped layer's frozen part
            if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad \
                    and base.weight.dtype == torch.float32:
                originals.append((base, base.weight.data))
                base.weight.data = base.weight.data.to(dtype)
    try:
        with disable_input_dtype_casting(model, active=half):
            yield
    finally:
        for base, weight in originals:
            base.weight.data = weight


def _trainer_class():
    import shutil

    import torch
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    class SafeTrainer(Trainer):
        """Writes each checkpoint under a temporary name and renames it once complete, so a
        process killed mid-save never leaves a `checkpoint-N` that resume would load.

        Packed batches (train.packing) reach the model with position_ids and no attention mask.

        With `trained_logits_only`, training computes the vocabulary projection and the loss
        at the positions that predict a trained token only. The prompt's positions have no
        loss, so their logits (a hidden x vocabulary matmul and a softmax over ~50k entries
        each, forward and backward) were work thrown away. The loss and gradients are the same
        (tests/test_speed.py). Validation does the same: its loss and its token accuracy look
        at those positions only (`_argmax_logits` puts the predictions back in place).

        With `fused_loss` (a CPU, and a causal LM whose head and loss are the plain ones), the
        passes go further: the projection and the loss are computed together, a few rows at a
        time, and the logits are never stored (nb_finetune/lm_loss.py). Validation gets each
        trained position's predicted token from the same chunks, in place of logits. The
        Trainer's own loss scaling (accumulation, processes) is untouched: the model still
        returns the loss from its forward pass."""
        _staging: str | None = None
        trained_logits_only = False
        fused_loss = None  # lm_loss.FusedCausalLMLoss: the training loss without the logits

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "position_ids" in inputs:
                # Packed rows (tokenization.pack): without an attention mask and without a cache,
                # transformers builds the block-diagonal causal mask from the position_ids, so
                # each original row sees only itself. The mask has served to count tokens.
                inputs = {k: v for k, v in inputs.items() if k != "attention_mask"} | {"use_cache": False}
            labels = inputs.get("labels")
            if self.trained_logits_only and labels is not None and labels.dim() == 2:
                keep, following = trained_positions(labels)
                inputs = {**inputs, "logits_to_keep": keep, "shift_labels": following}
                if self.fused_loss is not None and (model.training or not torch.is_grad_enabled()):
                    with self.fused_loss.swapped_in():
                        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                    # A pass without gradients (validation) predicted the tokens: hand those on, not logits.
                    if return_outputs and self.fused_loss.predictions is not None:
                        result[1]["logits"] = self.fused_loss.predictions  # token ids (see _argmax_logits)
                    return result
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = super()._get_output_dir(trial)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = os.path.join(run_dir, f".partial-{name}")
            shutil.rmtree(staging, ignore_errors=True)
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)  # into staging/checkpoint-N
            finally:
                self._staging = None
            distributed.barrier()  # every process has written its part (each writes its own RNG state)
            if distributed.is_main():
                final = os.path.join(run_dir, name)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(os.path.join(staging, name), final)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(run_dir, self.args.save_total_limit, use_mtime=True)
            distributed.barrier()

    return SafeTrainer


def checkpoint_bytes(model) -> int:
    """Disk size of one checkpoint: trainable weights (fp32) plus AdamW's two moments."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + 1_000_000  # + RNG state, scheduler, config files


def check_disk(model, cfg: TrainConfig) -> None:
    """Refuse before training when the output folder cannot hold the checkpoints."""
    import shutil
    folder = Path(cfg.output_dir)
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    # save_total_limit (2) kept + one being written + the final adapter
    need = checkpoint_bytes(model) * 4
    if free < need:
        raise UserError(f"{probe} has {free / 2**20:,.0f} MiB free, and training needs about {need / 2**20:,.0f} MiB "
                        "for checkpoints; free some space or set train.output_dir to another disk")


def _oom_advice(cfg: TrainConfig) -> str:
    half = max(1, cfg.batch_size // 2)
    return (f"out of memory at batch_size {cfg.batch_size}, max_length {cfg.max_length}: try train.batch_size "
            f"{half} with train.grad_accum {cfg.grad_accum * cfg.batch_size // half} (the same effective batch), "
            "a shorter train.max_length, or model.quantization: 4bit (QLoRA)")


def _is_oom(err: BaseException) -> bool:
    import torch
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def train(model, train_ds, val_ds, collator, cfg: TrainConfig, callbacks=(), stop: threading.Event | None = None,
          precision: str = "float32", tokenizer=None, info: dict | None = None, quantized: bool = False,
          keep_freed_memory: bool = True) -> TrainResult:
    """Train `model` (already with adapters) and save its adapter under cfg.output_dir/adapter.

    keep_freed_memory: on a CPU, keep the memory each step frees for the next one while training
    (memory.freed_memory_kept; off only to measure what it saves).

    The history is written to cfg.output_dir/history.csv however training ends."""
    from transformers.trainer_utils import get_last_checkpoint

    check_disk(model, cfg)
    # Only the main process reports: one console, one history, one set of files.
    callbacks = list(callbacks) if distributed.is_main() else []
    args = training_arguments(cfg, precision, has_eval=val_ds is not None and len(val_ds) > 0, quantized=quantized)
    bridge = _bridge_class()(list(callbacks), stop, cfg.early_stopping_patience, info or {})
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds,
                               eval_dataset=val_ds if args.eval_strategy != "no" else None,
                               data_collator=collator, callbacks=[bridge], compute_metrics=token_accuracy,
                               preprocess_logits_for_metrics=_argmax_logits)
    trainer.trained_logits_only = keeps_logits_selectively(model)
    if trainer.trained_logits_only and not hardware.cuda_available():
        import torch

        from .lm_loss import FusedCausalLMLoss
        trainer.fused_loss = FusedCausalLMLoss.for_model(model, getattr(torch, precision))
    # Nothing prints from the training loop: events go to our callbacks instead. Matched by
    # name: importing transformers' notebook callback needs IPython, which a headless run lacks.
    for printer in [cb for cb in trainer.callback_handler.callbacks
                    if type(cb).__name__ in ("PrinterCallback", "ProgressCallback", "NotebookProgressCallback")]:
        trainer.remove_callback(printer)
    resume = None
    if cfg.resume_from == "last":
        resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    elif cfg.resume_from:
        resume = cfg.resume_from
    start = time.perf_counter()
    try:
        with frozen_weights_in(model, precision), attention.for_training(model), \
                memory.freed_memory_kept(keep_freed_memory and not hardware.cuda_available()):
            trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        # A kernel interrupt (or a second Ctrl-C) is a stop too: keep what the finished steps trained.
        bridge.stopped = True
        if trainer.state.global_step > 0:
            trainer._save_checkpoint(trainer.model, trial=None)
    except RuntimeError as err:
        if _is_oom(err):
            raise UserError(_oom_advice(cfg)) from None
        raise
    finally:
        if distributed.is_main():
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            bridge.history.to_csv(Path(cfg.output_dir) / "history.csv", index=False)
    seconds = time.perf_counter() - start
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
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
