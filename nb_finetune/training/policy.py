"""Training policy: accumulation, optimizer and checkpointing, the Trainer's arguments, disk
and out-of-memory checks. Pure decisions from the config and the hardware."""
from __future__ import annotations

from pathlib import Path

from .. import distributed, hardware
from ..config import TrainConfig
from ..errors import UserError


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


def is_oom(err: BaseException) -> bool:
    import torch
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
