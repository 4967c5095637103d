"""Memory: an estimate before anything is loaded, and the measured peak after training.

The estimate builds the model on the meta device (no weights are read) to count its
parameters and the LoRA adapters it would get, then adds up, in bytes:
  base weights   linear weights at 4 bytes (fp32 on CPU), 2 (16-bit on GPU), 1 (8-bit) or
                 ~0.53 (4-bit nf4: 0.5 + a 4-byte scale per 64 weights, less with double quant);
                 embeddings and norms stay 16/32-bit
  adapters       trainable parameters x (4 weight + 4 gradient + 8 AdamW moments), or
                 x (4 + 4 + 2) with an 8-bit optimizer
  activations    per layer and token, bytes kept for backward, measured on SmolLM2-135M: on a
                 GPU ~60 x hidden with a 16-bit base and ~75 x hidden with a 4-bit one (H200,
                 bf16); on a CPU with fp32 weights ~90 x hidden under bf16 autocast and ~155 x
                 hidden without it (a CPU without bf16); with
                 gradient checkpointing only the layer inputs (2 or 4 bytes x hidden) plus one
                 layer's worth (two on a GPU)
  logits         trained tokens x vocab x 14 bytes (16-bit logits, their fp32 copy, the
                 log-softmax and its gradient); on a CPU, where the loss is computed without
                 the logits (lm_loss), only one chunk of rows at a time, plus the head's weight
                 in the compute dtype (validation's logits come when no activations are kept)
  on a CPU also  the bf16 copies of the frozen linear weights held while training under bf16
                 autocast (2 bytes each; engine.frozen_weights_in), and
                 what the process holds already (Python, torch, the data): its resident memory now
"""
from __future__ import annotations

import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass

from . import hardware
from .config import RunConfig


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


def _meta_model(cfg: RunConfig, objective: str, num_labels: int):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .modeling import load_config
    model_config = load_config(cfg.model, progress=lambda m: None)
    with init_empty_weights():
        if objective == "head":
            model_config.num_labels = max(num_labels, 2)
            return AutoModelForSequenceClassification.from_config(model_config), model_config
        model = AutoModelForCausalLM.from_config(model_config)
    model.tie_weights()  # a tied output layer shares the embedding's memory
    return model, model_config


def estimate(cfg: RunConfig, objective: str = "completion", num_labels: int = 2,
             trained_share: float = 1.0) -> MemoryEstimate:
    """Peak memory of training, from the model's config alone (meta device).

    trained_share: the share of tokens that predict a trained token, once the data is
    tokenized; training computes logits only there. Before that, every position counts."""
    import torch
    model, mc = _meta_model(cfg, objective, num_labels)
    out_embed = model.get_output_embeddings() if objective != "head" else None
    linear, other, lora = 0, 0, 0
    targets = None if cfg.model.target_modules == "all-linear" else \
        {t.strip() for t in cfg.model.target_modules.split(",")}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_embed and "classifier" not in name \
                and "score" not in name:
            linear += module.weight.numel()
            if targets is None or name.split(".")[-1] in targets:
                lora += cfg.model.lora_r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    other = total - linear
    cuda = hardware.cuda_available()
    half = 2 if cuda else 4  # on CPU the base stays fp32 (faster with bf16 autocast here)
    per_linear = {"none": half, "8bit": 1, "4bit": 0.5 + (0.127 if cfg.model.double_quant else 0.5) / 8}
    quant = cfg.model.quantization
    t = cfg.train
    tokens = t.batch_size * t.max_length
    hidden, layers = mc.hidden_size, mc.num_hidden_layers
    from .engine import optimizer_and_checkpointing  # the same decision training makes
    checkpointing = optimizer_and_checkpointing(t, quant != "none")[1]
    # Bytes per token kept for one layer's backward, LoRA on every linear layer with dropout 0.05,
    # measured with SmolLM2 on full batches: on a CPU at 4 x 192 and 8 x 256 with bf16 autocast,
    # and at 4 and 8 x 192 in fp32 (a CPU without bf16: every activation twice the size);
    # on an H200 from the growth between 8 and 16 x 256 (benchmarks/gpu_check.py). A 4-bit
    # base keeps more: bitsandbytes' matmul saves its input too, and its residual stream is fp32.
    cpu_bf16 = not cuda and hardware.compute_dtype(cfg.model.compute_dtype) == "bfloat16"
    one_layer = ((75 if quant != "none" else 60) if cuda else (90 if cpu_bf16 else 155)) * hidden
    # With checkpointing, each layer's input, plus one layer's worth while it is recomputed (on a
    # GPU twice that: its gradients are live at the same time; measured with QLoRA on an H200).
    # The residual stream is fp32 on a CPU (fp32 base) and for a quantized base (peft's
    # prepare_model_for_kbit_training upcasts the norms and embeddings); bf16 for a 16-bit base.
    per_token_layer = (2 if cuda and quant == "none" else 4) * hidden if checkpointing else one_layer
    recomputed = (2 if cuda else 1) * one_layer if checkpointing else 0
    from .lm_loss import chunk_rows_for, has_plain_head  # what training will do
    logit_rows = tokens * trained_share
    logits = 0 if objective == "head" else logit_rows * mc.vocab_size * 14
    # An adapter on lm_head (named in target_modules; "all-linear" leaves it out) keeps the logits.
    if not cuda and objective != "head" and has_plain_head(model) and "lm_head" not in (targets or ()):
        chunk = chunk_rows_for(torch.bfloat16 if cpu_bf16 else torch.float32)
        logits = min(logit_rows, chunk) * mc.vocab_size * 14 + mc.vocab_size * hidden * 2
    parts = {
        "base weights": linear * per_linear[quant] + other * (2 if quant != "none" else half),
        "adapters and optimizer": lora * (4 + 4 + (2 if quant != "none" and cuda else 8)),
        "activations": per_token_layer * tokens * layers + recomputed * tokens,
        "logits": logits,
    }
    if not cuda:
        import psutil
        if cpu_bf16 and quant == "none":
            parts["bf16 weight copies"] = linear * 2
        parts["process now"] = psutil.Process().memory_info().rss
    head = hidden * max(num_labels, 2) if objective == "head" else 0
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


# glibc's mallopt parameters (malloc.h) and its defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM, _DEFAULT_MMAPS = 128 * 1024, 65536
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20   # the largest glibc accepts on 64-bit
_NO_TRIM = -1                        # mallopt(3): -1 turns trimming off


def _glibc():
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def allocator_tuned_by_environment() -> bool:
    """Whether MALLOC_* variables tune glibc on purpose (Binder's start script does, to fit in
    2 GB): then neither freed_memory_kept nor huge_pages_for_tensors changes anything."""
    return any(k.startswith("MALLOC_") for k in os.environ)


def resident_bytes(kind: str) -> int | None:
    """This process's resident memory of one kind, as /proc/self/smaps_rollup names it
    ("Anonymous": its own, not file pages; "AnonHugePages": on transparent huge pages);
    None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(kind + ":"))
    except OSError:
        return None


@contextmanager
def freed_memory_kept(enabled: bool = True):
    """Keep the memory a step frees for the next step, then give it back (around training and
    evaluation on a CPU).

    A CPU training step allocates and frees several GB of activations (an evaluation batch
    less, but batch after batch). With glibc's defaults much of that goes back to the system
    when freed (blocks above its mmap threshold are unmapped, and the top of the heap is
    trimmed), so the next step touches fresh pages and the kernel zero-fills every one:
    300,000-760,000 page faults in 8 steps on Alpaca 8 x 256 (benchmarks/train_speed.py,
    part 10). Here every block comes from the heap (none is mapped on its own; a thread's
    arena still maps what exceeds its 64 MB heaps) and the heap is not trimmed meanwhile.
    Afterwards mapping and trimming are restored, with the threshold left at glibc's own
    ceiling of 32 MB, and the free memory is returned (malloc_trim): glibc's defaults had left
    the process holding nearly all of training's peak after it ended. Whether steps get faster
    is within the noise of the CPU it was measured on; the memory given back is not.

    Does nothing where the allocator is not glibc's, or where MALLOC_* variables already tune
    it (Binder's start script sets a low threshold on purpose, to fit in 2 GB)."""
    libc = _glibc() if enabled and not allocator_tuned_by_environment() else None
    if libc is None:
        yield False
        return
    # mallopt returns 0 for a value it refuses; whatever was set is put back below either way
    applied = all([libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM),
                   libc.mallopt(_M_MMAP_MAX, 0)])
    try:
        yield applied
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAPS)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)


THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_for_tensors(setting: str = THP_SETTING) -> bool:
    """Have torch back its CPU tensors of 2 MB or more with transparent huge pages; whether
    they are on. Runs when nb_finetune is imported: torch reads its THP_MEM_ALLOC_ENABLE once,
    at its first CPU allocation, so later would be too late.

    A CPU training step streams several GB of activations through memory. With 4 KB pages
    that is a TLB entry per 4 KB, and a miss in a virtual machine walks two page tables. On a
    2-core AMD EPYC with bf16 (Zen 4), profiled inside a training step, the fp32 copy of each
    128-row chunk of the loss's logits (25 MB) took 19 ms on 4 KB pages and 6 ms on 2 MB ones,
    and the activations' own copies halved; timed whole, without the profiler, steps took
    the same time within that CPU's noise, `nb-finetune demo` reached its first step about
    1 s sooner (13.9 s against 15.0 s) and Alpaca's peak was 0.4 GB lower
    (benchmarks/train_speed.py, parts 4, 9 and 10). Huge pages pay off because the engine
    keeps the memory a step frees for the next one (freed_memory_kept): zero-filled once, not
    on every step. The values computed are the same; only where they sit changes.

    Left alone where THP_MEM_ALLOC_ENABLE is already set (0 turns this off), where MALLOC_*
    variables tune glibc for a small memory limit (Binder: 2 MB alignment would waste some of
    it), and where the kernel offers no huge pages on request (not Linux, or "never")."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    if allocator_tuned_by_environment():
        return False
    try:
        with open(setting) as f:
            offered = "[never]" not in f.read()
    except OSError:
        return False
    if offered:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return offered
