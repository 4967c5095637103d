"""Training policy: accumulation, optimizer and checkpointing, the Trainer's arguments, disk
and out-of-memory checks. Pure decisions from the config and the hardware."""
from __future__ import annotations

from pathlib import Path

from .. import distributed, hardware
from ..config import TrainConfig
from ..errors import UserError
from .trackers import report_to


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
    tensors, several times quicker than the multi-tensor one, the same updates to float
    rounding) and no recomputation."""
    qlora_gpu = quantized and hardware.cuda_available()
    optim = cfg.optimizer if cfg.optimizer != "auto" else ("paged_adamw_8bit" if qlora_gpu else "adamw_torch_fused")
    checkpointing = cfg.gradient_checkpointing == "yes" or (cfg.gradient_checkpointing == "auto" and qlora_gpu)
    return optim, checkpointing


# 'auto' uses Liger only for families a GPU run of benchmarks/gpu_check.py measured at equal loss.
LIGER_MEASURED: tuple[str, ...] = ()


def liger_supported_types() -> tuple[set, str]:
    """The model types Liger Kernel patches, read from its own table; empty with the reason when
    the installed copy does not import (a Triton without a driver, a version mismatch)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as err:  # any import failure means: train without it
        return set(), f"liger-kernel does not import ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return set(MODEL_TYPE_TO_APPLY_LIGER_FN), ""


def use_liger(cfg: TrainConfig, model_type: str) -> tuple[bool, str]:
    """Whether Liger Kernel trains this model, and one line saying so or why it falls back."""
    if cfg.liger_kernel == "off":
        return False, ""
    ok, why = hardware.liger_available()
    if ok:
        supported, why = liger_supported_types()
        wanted = supported if cfg.liger_kernel == "on" else supported & set(LIGER_MEASURED)
        if model_type in wanted:
            return True, f"Liger Kernel: fused linear + cross-entropy, RMSNorm, SwiGLU and RoPE for {model_type}"
        why = why or (f"model type {model_type!r} is not one Liger supports" if model_type not in supported else
                      f"model type {model_type!r} has no GPU measurement of equal loss yet "
                      "(benchmarks/gpu_check.py; train.liger_kernel: on forces it)")
    return False, f"Liger Kernel off: {why}; training with transformers' own layers"


# How each attention implementation keeps a padding-free row's rows apart, given position ids
# that restart and no attention mask (transformers 5.x, masking_utils and flash-attention utils).
PACKED_ATTENTION = {
    "flash_attention_2": "flash-attention's varlen kernel (sequence bounds from the position ids)",
    "flash_attention_3": "flash-attention's varlen kernel (sequence bounds from the position ids)",
    "sdpa": "SDPA with a block-diagonal mask built from the position ids",
    "eager": "a block-diagonal mask built from the position ids",
    "flex_attention": "flex attention with a block mask built from the position ids",
}
PADDING_FREE_NEEDS_CAUSAL_LM = ("train.padding_free: on needs a causal-LM objective: a classification head "
                                "reads one row per input; set train.padding_free to auto or off")


def builds_masks_from_positions(model) -> bool:
    """Whether the model builds its attention mask with transformers' masking utilities, which
    read restarting position ids as separate sequences (older model code would mix the rows)."""
    import sys
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(sys.modules.get(type(base).__module__), "create_causal_mask")


def use_padding_free(cfg: TrainConfig, model, causal_lm: bool) -> tuple[bool, str]:
    """Whether training batches go padding-free (data.collator.CompletionOnlyCollator.flattened),
    and one line saying how attention stays inside each row, or why not. 'on' refuses what
    cannot keep the rows apart rather than train them mixed."""
    if cfg.padding_free == "off" or (cfg.padding_free == "auto" and not hardware.cuda_available()):
        return False, ""
    if not causal_lm:
        if cfg.padding_free == "on":
            raise UserError(PADDING_FREE_NEEDS_CAUSAL_LM)
        return False, ""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    how = PACKED_ATTENTION.get(attention) if builds_masks_from_positions(model) else None
    if how is None:
        why = (f"padding-free batches need a model that builds its masks with transformers' masking utilities and "
               f"one of the attention implementations {', '.join(PACKED_ATTENTION)}; this "
               f"{getattr(config, 'model_type', 'model')} uses {attention!r}")
        if cfg.padding_free == "on":
            raise UserError(f"train.padding_free: on: {why}; set train.padding_free to auto or off")
        return False, f"{why}: padding each batch instead"
    return True, f"padding-free batches: each batch's rows in one row, attention kept inside each row by {how}"


def training_arguments(cfg: TrainConfig, precision: str, has_eval: bool, quantized: bool = False,
                       liger: bool = False):
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
        use_cpu=not hardware.cuda_available(), report_to=report_to(cfg), disable_tqdm=True,
        run_name=Path(cfg.output_dir).name,  # the run's name in a tracker
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        train_sampling_strategy="group_by_length", remove_unused_columns=False,
        label_names=["labels"], optim=optim, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        use_liger_kernel=liger,
    )


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


def oom_advice(cfg: TrainConfig) -> str:
    half = max(1, cfg.batch_size // 2)
    return (f"out of memory at batch_size {cfg.batch_size}, max_length {cfg.max_length}: try train.batch_size "
            f"{half} with train.grad_accum {cfg.grad_accum * cfg.batch_size // half} (the same effective batch), "
            "a shorter train.max_length, or model.quantization: 4bit (QLoRA)")


def oom_rescue(cfg: TrainConfig, quantized: bool) -> tuple[TrainConfig, str] | None:
    """The next, smaller try after running out of GPU memory before the first optimizer step, and
    the sentence that says it; None when nothing is left to try.

    Half the rows per pass and twice the passes per step keep the effective batch (8 x 1 = 4 x 2
    rows per step); at one row per pass, gradient checkpointing recomputes activations instead."""
    import dataclasses
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        # effective_batch, when set, derives the accumulation from the new batch size itself
        accum = cfg.grad_accum if cfg.effective_batch else cfg.grad_accum * cfg.batch_size // half
        smaller = dataclasses.replace(cfg, batch_size=half, grad_accum=accum)
        return smaller, (f"out of GPU memory at batch_size {cfg.batch_size}: retrying with batch_size {half} and "
                         f"{accumulation(smaller)} passes per step (the same effective batch)")
    if not optimizer_and_checkpointing(cfg, quantized)[1]:
        return (dataclasses.replace(cfg, gradient_checkpointing="yes"),
                "out of GPU memory at batch_size 1: retrying with gradient checkpointing (activations recomputed "
                "in the backward pass)")
    return None


def nonfinite_advice(step: int, loss: float, cfg: TrainConfig, precision: str, last: str | None) -> str:
    """The step where the loss stopped being a number, its likely cause in this precision, the fix."""
    if precision == "float16":
        # fp16 tops out at 65,504: activations past it are inf, then NaN. Loss scaling guards
        # the gradients, not the forward pass.
        cause = ("fp16 overflow (fp16 holds values up to 65,504): set model.compute_dtype: float32, or bfloat16 "
                 f"on a GPU that has it, or lower train.learning_rate={cfg.learning_rate:g} to a tenth")
    else:
        cause = (f"a learning rate too high (train.learning_rate={cfg.learning_rate:g}: try a tenth of it) "
                 "or a bad row in the data")
    return (f"the training loss became {loss} at step {step} (computing in {precision}); likely cause: {cause}; "
            f"the last good checkpoint is {last or 'none (no checkpoint was saved before it)'}")


def is_oom(err: BaseException) -> bool:
    import torch
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def is_gpu_oom(err: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (the same class as torch.OutOfMemoryError): the one a smaller
    try can rescue; a CPU allocator's failure takes the machine's memory with it."""
    import torch
    return isinstance(err, torch.OutOfMemoryError)
