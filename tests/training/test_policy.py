"""Training policy: accumulation that keeps the effective batch, the optimizer and checkpointing
chosen for the hardware, and what counts as running out of memory."""
import pytest
import torch

from nb_finetune import UserError, hardware
from nb_finetune.config import TrainConfig
from nb_finetune.training.policy import accumulation, is_oom, oom_advice, optimizer_and_checkpointing


def test_accumulation_keeps_the_effective_batch_across_process_counts(monkeypatch):
    assert accumulation(TrainConfig(batch_size=2, grad_accum=3)) == 3  # no effective_batch: grad_accum as set
    cfg = TrainConfig(batch_size=2, grad_accum=3, effective_batch=8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert accumulation(cfg) == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accumulation(cfg) == 2
    with pytest.raises(UserError, match=r"effective_batch=6 is not a multiple of batch_size 2 x 2 process\(es\) = 4"):
        accumulation(TrainConfig(batch_size=2, effective_batch=6))  # fits one process (x 3), not two
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"train.effective_batch=10 is not a multiple of batch_size 4 x 1 "
                                        r"process\(es\) = 4; choose a multiple"):
        accumulation(TrainConfig(batch_size=4, effective_batch=10))


def test_qlora_on_a_gpu_gets_paged_adamw_and_checkpointing_and_a_cpu_the_fused_adamw(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    assert optimizer_and_checkpointing(TrainConfig(), quantized=True) == ("paged_adamw_8bit", True)
    assert optimizer_and_checkpointing(TrainConfig(), quantized=False) == ("adamw_torch_fused", False)
    assert optimizer_and_checkpointing(TrainConfig(optimizer="adamw_torch", gradient_checkpointing="no"),
                                       quantized=True) == ("adamw_torch", False)
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    assert optimizer_and_checkpointing(TrainConfig(), quantized=True) == ("adamw_torch_fused", False)
    assert optimizer_and_checkpointing(TrainConfig(gradient_checkpointing="yes"), quantized=False) == \
        ("adamw_torch_fused", True)


def test_running_out_of_memory_is_told_from_other_errors():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"))
    advice = oom_advice(TrainConfig(batch_size=8, grad_accum=2, max_length=512))
    assert "batch_size 8, max_length 512" in advice and "train.batch_size 4 with train.grad_accum 4" in advice


def test_non_finite_loss_advice_names_the_step_and_the_fix_for_the_precision():
    from nb_finetune.training.policy import nonfinite_advice
    cfg = TrainConfig(learning_rate=2e-4)
    fp16 = nonfinite_advice(7, float("inf"), cfg, "float16", None)
    assert fp16.startswith("the training loss became inf at step 7 (computing in float16)")
    assert "fp16 overflow" in fp16 and "model.compute_dtype: float32" in fp16 and "none (no checkpoint" in fp16
    fp32 = nonfinite_advice(7, float("nan"), cfg, "float32", "runs/x/checkpoint-5")
    assert "fp16" not in fp32 and "train.learning_rate=0.0002" in fp32 and fp32.endswith("runs/x/checkpoint-5")


def test_oom_rescue_halves_down_to_one_row_then_checkpoints_then_gives_up(monkeypatch):
    from nb_finetune.training.policy import oom_rescue
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    cfg, steps = TrainConfig(batch_size=8, grad_accum=2, gradient_checkpointing="auto"), []
    while (rescue := oom_rescue(cfg, quantized=False)) is not None:
        cfg = rescue[0]
        steps.append((cfg.batch_size, accumulation(cfg), cfg.gradient_checkpointing))
    assert steps == [(4, 4, "auto"), (2, 8, "auto"), (1, 16, "auto"), (1, 16, "yes")]
    # with effective_batch set the accumulation follows from it; QLoRA on a GPU checkpoints already
    cfg = TrainConfig(batch_size=2, effective_batch=16)
    half = oom_rescue(cfg, quantized=True)[0]
    assert (half.batch_size, accumulation(half)) == (1, 16) and oom_rescue(half, quantized=True) is None


def test_liger_falls_back_with_one_line_on_this_machine_or_without_triton_or_support(monkeypatch):
    from nb_finetune.training.policy import use_liger
    hardware.liger_available.cache_clear()
    assert use_liger(TrainConfig(liger_kernel="off"), "llama") == (False, "")
    if not hardware.cuda_available():  # this CPU machine: no GPU, so the guard answers before any import
        used, note = use_liger(TrainConfig(liger_kernel="on"), "llama")
        assert not used and note == ("Liger Kernel off: Liger Kernel needs a CUDA GPU (its kernels are Triton); "
                                     "training with transformers' own layers")
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    hardware.liger_available.cache_clear()
    try:
        used, note = use_liger(TrainConfig(), "llama")
        assert not used and "triton is not installed (pip install triton)" in note and "\n" not in note
    finally:
        hardware.liger_available.cache_clear()


def test_liger_follows_its_own_table_of_models(monkeypatch):
    """With Liger importable on a GPU: 'auto' only for the families a GPU benchmark measured at equal
    loss (none yet), 'on' for any it supports, a note for the rest; a copy that does not import falls
    back too."""
    from nb_finetune.training import policy
    monkeypatch.setattr(hardware, "liger_available", lambda: (True, ""))
    monkeypatch.setattr(policy, "liger_supported_types", lambda: ({"llama", "qwen2"}, ""))
    assert policy.LIGER_MEASURED == ()
    used, note = policy.use_liger(TrainConfig(), "llama")
    assert not used and "'llama' has no GPU measurement of equal loss yet" in note and "\n" not in note
    assert policy.use_liger(TrainConfig(liger_kernel="on"), "llama")[0]
    monkeypatch.setattr(policy, "LIGER_MEASURED", ("llama",))
    assert policy.use_liger(TrainConfig(), "llama")[0]
    assert not policy.use_liger(TrainConfig(), "qwen2")[0]
    assert policy.use_liger(TrainConfig(liger_kernel="on"), "qwen2")[0]
    used, note = policy.use_liger(TrainConfig(liger_kernel="on"), "bert")
    assert not used and "'bert' is not one Liger supports" in note
    monkeypatch.undo()
    import importlib.util
    if importlib.util.find_spec("liger_kernel") is None:
        types, why = policy.liger_supported_types()
        assert types == set() and why.startswith("liger-kernel does not import (ModuleNotFoundError")
