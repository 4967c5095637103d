"""The memory estimate made before loading, against the peak measured after training."""
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import SUBPROCESS_ENV

from nb_finetune import hardware, load_preset
from nb_finetune.memory import estimate


def test_estimate_parts_follow_the_settings():
    base = estimate(load_preset("demo"))
    q4 = estimate(load_preset("demo").with_overrides({"model.quantization": "4bit"}))
    assert q4.parts["base weights"] < base.parts["base weights"] / 3  # 4-bit vs fp32 linear weights
    longer = estimate(load_preset("demo").with_overrides({"train.max_length": 512}))
    assert longer.parts["activations"] == 2 * base.parts["activations"]
    assert "GiB" in base.summary()
    # the logits: all of them where the model's own loss runs; on a CPU, where the loss is
    # computed without them for SmolLM2's plain head (kernels/loss.py), one chunk at any length
    assert longer.parts["logits"] == 2 * base.parts["logits"] if hardware.cuda_available() else \
        longer.parts["logits"] == base.parts["logits"]
    adapted_head = load_preset("demo").with_overrides({"model.target_modules": "q_proj,lm_head"})
    own_loss = estimate(adapted_head, trained_share=0.5)
    tokens = adapted_head.train.batch_size * adapted_head.train.max_length
    assert own_loss.parts["logits"] == int(tokens * 0.5 * 49152 * 14) > 2 * base.parts["logits"]


RUN = textwrap.dedent("""
    import json, sys
    import psutil
    from nb_finetune import load_preset
    from nb_finetune.kernels.allocator import resident_bytes
    from nb_finetune.pipeline import Session
    cfg = load_preset("demo").with_overrides({"train.max_steps": 2, "train.eval_steps": 100,
        "train.batch_size": 4, "train.max_length": 192, "train.output_dir": sys.argv[1]})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(); s.tokenize(); s.load_model()
    # the process's own memory: resident but not file-backed (bf16 training pages in about
    # 0.5 GB more of torch's libraries, which the kernel can drop and reread at will)
    held = lambda: resident_bytes("Anonymous") or psutil.Process().memory_info().rss
    before = held()
    s.train()
    print(json.dumps({"estimate": s.memory_estimate.total, "peak": s.peak_memory, "before": before,
                      "after": held()}))
""")
# glibc's own settings, as a user's machine has them (Binder's start script sets its own).
PLAIN_ENV = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith("MALLOC_")}


@pytest.mark.slow
def test_estimate_is_close_to_the_measured_peak(tmp_path):
    """SmolLM2-135M, batch 4 x 192 tokens, in a fresh process (peak memory is per process)."""
    proc = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "run")], capture_output=True, text=True,
                          env=PLAIN_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.8 < got["estimate"] / got["peak"] < 1.2, got
    if not hardware.cuda_available():
        # what training took is given back when it ends (the kernels keep freed memory only while
        # training, kernels.allocator.freed_memory_kept): with glibc's defaults the process kept
        # nearly all of it
        assert got["after"] - got["before"] < 0.25 * (got["peak"] - got["before"]), got


def test_peak_is_the_process_own_not_its_parents():
    """Linux carries a peak resident size across exec; a child of a big process must not report it."""
    import numpy as np
    big = np.ones(1_500_000_000 // 8)  # 1.5 GB held by this (parent) process
    code = "from nb_finetune import memory; memory.reset_peak(); print(memory.measured_peak())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert int(proc.stdout.strip().splitlines()[-1]) < 1_000_000_000, proc.stderr[-2000:]
    del big


GPU_RUN = textwrap.dedent("""
    import json, sys
    from nb_finetune import load_preset
    from nb_finetune.pipeline import Session
    cfg = load_preset("qlora-gpu").with_overrides({"data.source": sys.argv[1], "data.text_column": "sentence",
        "data.label_column": "label", "model.quantization": sys.argv[2], "train.max_steps": 3,
        "train.eval_steps": 100, "train.batch_size": 16, "train.grad_accum": 1, "train.max_length": 256,
        "train.output_dir": sys.argv[3]})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(); s.tokenize(); s.load_model(); s.train()
    print(json.dumps({"estimate": s.memory_estimate.total, "peak": s.peak_memory}))
""")


@pytest.mark.gpu
@pytest.mark.skipif(not hardware.cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_gpu_estimate_is_close_to_the_measured_peak(quantization, tmp_path, shared_data):
    """SmolLM2-135M on a GPU, LoRA (bf16 base) and QLoRA (4-bit base, gradient checkpointing),
    16 rows of 256 tokens: each row joins 32 SST-2 phrases, so every batch is full, as the
    estimate assumes."""
    import pandas as pd
    train = pd.read_csv(shared_data / "sst2" / "train.tsv", sep="\t").head(32 * 400)
    rows = pd.DataFrame({"sentence": [" ".join(g) for g in train["sentence"].to_numpy().reshape(-1, 32)],
                         "label": train["label"].to_numpy()[::32]})
    rows.to_csv(tmp_path / "long.csv", index=False)
    proc = subprocess.run([sys.executable, "-c", GPU_RUN, str(tmp_path / "long.csv"), quantization, str(tmp_path / "run")],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.85 < got["estimate"] / got["peak"] < 1.15, got


def test_an_estimate_builds_on_meta_for_its_own_thread_only(tiny_model_dir, monkeypatch):
    """A panel's estimate runs beside training: a model loading on another thread meanwhile keeps real weights."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from nb_finetune import RunConfig, memory
    seen, build = {}, AutoModelForCausalLM.from_config

    def build_while_another_thread_loads(config, **kwargs):
        other = threading.Thread(target=lambda: seen.update(other=torch.nn.Linear(2, 2).weight.device.type))
        other.start()
        other.join()
        return build(config, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", build_while_another_thread_loads)
    model, _ = memory.meta_model(RunConfig.from_dict({"model": {"name": str(tiny_model_dir)}}), "completion", 2)
    assert next(model.parameters()).device.type == "meta" and seen == {"other": "cpu"}
