"""Memory: an estimate before anything is loaded, and the measured peak after training.

The estimate builds the model on the meta device (no weights are read) to count its
parameters and the LoRA adapters it would get, then adds up, in bytes:
  base weights   linear weights at 4 bytes (fp32 on CPU), 2 (16-bit on GPU), 1 (8-bit) or
                 ~0.53 (4-bit nf4: 0.5 + a 4-byte scale per 64 weights, less with double quant);
                 embeddings and norms stay 16/32-bit
  adapters       trainable parameters x (4 weight + 4 gradient + 8 AdamW moments), or
                 x (4 + 4 + 2) with an 8-bit optimizer
  activations    per layer and token, the bytes kept for backward (ACTIVATION_BYTES,
                 measured on SmolLM2-135M; tests/test_memory.py holds the estimate to a peak); with
                 gradient checkpointing only the layer inputs (2 or 4 bytes x hidden) plus one
                 layer's worth (two on a GPU)
  logits         trained tokens x vocab x 14 bytes (16-bit logits, their fp32 copy, the
                 log-softmax and its gradient); with the CPU kernels' fused loss, which keeps no
                 logits, only one chunk of rows at a time, plus the head's weight in the compute
                 dtype (validation's logits come when no activations are kept)
  on a CPU also  the bf16 copies of the frozen linear weights held while training under bf16
                 autocast with the CPU kernels (2 bytes each), and
                 what the process holds already (Python, torch, the data): its resident memory now
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

from . import hardware, kernels
from .config import RunConfig

# Bytes per token and hidden unit kept for one layer's backward, LoRA on every linear layer
# with dropout 0.05: on a GPU with a 16-bit or a 4-bit base (bitsandbytes' matmul saves its
# input too, and its residual stream is fp32); on a CPU with fp32 weights, under bf16
# autocast or without it (every activation twice the size).
ACTIVATION_BYTES = {"cuda": 60, "cuda, quantized base": 75, "cpu bf16": 90, "cpu": 155}


@dataclass
class MemoryEstimate:
    parts: dict          # name -> bytes
    device: str
    trainable: int = 0   # parameters the optimizer updates: LoRA matrices (+ a classification head)
    total_params: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def summary(self) -> str:
        gib = 2 ** 30
        inner = ", ".join(f"{k} {v / gib:.2f}" for k, v in self.parts.items())
        return f"memory estimate on {self.device}: {self.total / gib:.2f} GiB ({inner})"


def meta_model(cfg: RunConfig, objective: str, num_labels: int):
    """The model built on the meta device (no weights read), and its transformers config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .modeling import load_config
    model_config = load_config(cfg.model, progress=lambda m: None)
    # torch's device context is per thread; accelerate's init_empty_weights patches every module
    # class, so a panel's estimate would put a model loading on the training thread on meta too.
    with torch.device("meta"):
        if objective == "head":
            model_config.num_labels = max(num_labels, 2)
            return AutoModelForSequenceClassification.from_config(model_config), model_config
        model = AutoModelForCausalLM.from_config(model_config)
    model.tie_weights()  # a tied output layer shares the embedding's memory
    return model, model_config


def count_parameters(model, cfg: RunConfig, objective: str) -> tuple[int, int, int]:
    """(frozen linear weights, LoRA parameters they get, all parameters)."""
    import torch
    out_embed = model.get_output_embeddings() if objective != "head" else None
    targets = None if cfg.model.target_modules == "all-linear" else \
        {t.strip() for t in cfg.model.target_modules.split(",")}
    linear, lora = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_embed and "classifier" not in name \
                and "score" not in name:
            linear += module.weight.numel()
            if targets is None or name.split(".")[-1] in targets:
                lora += cfg.model.lora_r * (module.in_features + module.out_features)
    return linear, lora, sum(p.numel() for p in model.parameters())


def activation_bytes(cfg: RunConfig, hidden: int, layers: int, tokens: int, cpu_bf16: bool) -> float:
    """What the layers keep for backward, with or without gradient checkpointing."""
    from .training.policy import optimizer_and_checkpointing  # the same decision training makes
    cuda, quantized = hardware.cuda_available(), cfg.model.quantization != "none"
    checkpointing = optimizer_and_checkpointing(cfg.train, quantized)[1]
    kind = ("cuda, quantized base" if quantized else "cuda") if cuda else "cpu bf16" if cpu_bf16 else "cpu"
    one_layer = ACTIVATION_BYTES[kind] * hidden
    if not checkpointing:
        return one_layer * tokens * layers
    # Each layer's input, plus one layer's worth while it is recomputed (on a GPU twice that: its
    # gradients are live at the same time). The residual stream is fp32 on a CPU (fp32 base) and
    # for a quantized base (peft upcasts the norms and embeddings); bf16 for a 16-bit base.
    per_token_layer = (2 if cuda and not quantized else 4) * hidden
    return per_token_layer * tokens * layers + (2 if cuda else 1) * one_layer * tokens


def logit_bytes(cfg: RunConfig, model, mc, objective: str, logit_rows: float, cpu_bf16: bool) -> float:
    """The logits of the trained positions, or one chunk of them with the fused loss."""
    import torch

    from .kernels.loss import chunk_rows_for, has_plain_head  # what training will do
    if objective == "head":
        return 0
    adapted_head = "lm_head" in {t.strip() for t in cfg.model.target_modules.split(",")}
    if kernels.wanted(cfg.train.cpu_kernels) and has_plain_head(model) and not adapted_head:
        chunk = chunk_rows_for(torch.bfloat16 if cpu_bf16 else torch.float32)
        return min(logit_rows, chunk) * mc.vocab_size * 14 + mc.vocab_size * mc.hidden_size * 2
    return logit_rows * mc.vocab_size * 14


def estimate(cfg: RunConfig, objective: str = "completion", num_labels: int = 2,
             trained_share: float = 1.0) -> MemoryEstimate:
    """Peak memory of training, from the model's config alone (meta device).

    trained_share: the share of tokens that predict a trained token, once the data is
    tokenized; training computes logits only there. Before that, every position counts."""
    model, mc = meta_model(cfg, objective, num_labels)
    linear, lora, total = count_parameters(model, cfg, objective)
    cuda, quant = hardware.cuda_available(), cfg.model.quantization
    half = 2 if cuda else 4  # on CPU the base stays fp32 (faster with bf16 autocast there)
    per_linear = {"none": half, "8bit": 1, "4bit": 0.5 + (0.127 if cfg.model.double_quant else 0.5) / 8}
    cpu_bf16 = not cuda and hardware.compute_dtype(cfg.model.compute_dtype) == "bfloat16"
    tokens = cfg.train.batch_size * cfg.train.max_length
    parts = {
        "base weights": linear * per_linear[quant] + (total - linear) * (2 if quant != "none" else half),
        "adapters and optimizer": lora * (4 + 4 + (2 if quant != "none" and cuda else 8)),
        "activations": activation_bytes(cfg, mc.hidden_size, mc.num_hidden_layers, tokens, cpu_bf16),
        "logits": logit_bytes(cfg, model, mc, objective, tokens * trained_share, cpu_bf16),
    }
    if not cuda:
        import psutil
        if cpu_bf16 and quant == "none" and kernels.wanted(cfg.train.cpu_kernels):
            parts["bf16 weight copies"] = linear * 2
        parts["process now"] = psutil.Process().memory_info().rss
    head = mc.hidden_size * max(num_labels, 2) if objective == "head" else 0
    return MemoryEstimate({k: int(v) for k, v in parts.items()}, "cuda" if cuda else "cpu", lora + head, total)


def reset_peak() -> None:
    """Start measuring the peak from now."""
    if hardware.cuda_available():
        import torch
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux keeps a process's peak resident memory across exec, so a child of a large process
    # would report its parent's peak; writing 5 to clear_refs resets that high-water mark.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measured_peak() -> int:
    """Peak bytes since `reset_peak`: CUDA memory allocated on a GPU, else peak resident memory."""
    if hardware.cuda_available():
        import torch
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
