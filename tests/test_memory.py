"""The memory estimate made before loading, against the peak measured after training."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from nb_finetune import hardware, load_preset
from nb_finetune.memory import THP_SETTING, estimate

from conftest import SUBPROCESS_ENV


def test_estimate_parts_follow_the_settings():
    base = estimate(load_preset("demo"))
    q4 = estimate(load_preset("demo").with_overrides({"model.quantization": "4bit"}))
    assert q4.parts["base weights"] < base.parts["base weights"] / 3  # 4-bit vs fp32 linear weights
    longer = estimate(load_preset("demo").with_overrides({"train.max_length": 512}))
    assert longer.parts["activations"] == 2 * base.parts["activations"]
    assert "GiB" in base.summary()
    # the logits: all of them where the model's own loss runs; on a CPU, where the loss is
    # computed without them for SmolLM2's plain head (lm_loss), one chunk at any length
    assert longer.parts["logits"] == 2 * base.parts["logits"] if hardware.cuda_available() else \
        longer.parts["logits"] == base.parts["logits"]
    adapted_head = load_preset("demo").with_overrides({"model.target_modules": "q_proj,lm_head"})
    own_loss = estimate(adapted_head, trained_share=0.5)
    tokens = adapted_head.train.batch_size * adapted_head.train.max_length
    assert own_loss.parts["logits"] == int(tokens * 0.5 * 49152 * 14) > 2 * base.parts["logits"]


RUN = textwrap.dedent("""
    import json, sys
    import psutil
    from nb_finetune import hardware, load_preset, memory
    from nb_finetune.job import Session
    cfg = load_preset("demo").with_overrides({"train.max_steps": 2, "train.eval_steps": 100,
        "train.batch_size": 4, "train.max_length": 192, "train.output_dir": sys.argv[1]})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(); s.tokenize(); s.load_model()
    # the process's own memory: resident but not file-backed (bf16 training pages in about
    # 0.5 GB more of torch's libraries, which the kernel can drop and reread at will)
    held = lambda: memory.resident_bytes("Anonymous") or psutil.Process().memory_info().rss
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
        # what training took is given back when it ends (memory.freed_memory_kept): with glibc's
        # defaults the process kept nearly all of it (benchmarks/train_speed.py, part 10)
        assert got["after"] - got["before"] < 0.25 * (got["peak"] - got["before"]), got


VALIDATE = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import pandas as pd, torch
    from transformers import TrainingArguments
    from nb_finetune import config, data, engine, memory, modeling
    from nb_finetune.lm_loss import FusedCausalLMLoss
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, TokenizedDataset, tokenize_frame
    raw = pd.DataFrame(json.loads((Path(sys.argv[1]) / "alpaca_demo" / "alpaca_en_demo.json").read_text()))
    frame = data.normalize(raw.iloc[:200], config.DataConfig(task="completion"))
    mcfg = config.ModelConfig()
    tok = modeling.load_tokenizer(mcfg, progress=lambda m: None)
    rows, _ = tokenize_frame(frame, Formatter.build(tok, "completion", [], 256))
    rows = TokenizedDataset(sorted(rows.features, key=lambda f: -len(f["input_ids"]))[:8])  # 8 x 256, mostly trained
    model = modeling.load_base(mcfg, "completion", progress=lambda m: None).requires_grad_(False)
    trainer = engine._trainer_class()(
        model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none",
                                            per_device_eval_batch_size=8),
        eval_dataset=rows, data_collator=CompletionOnlyCollator(tok.pad_token_id),
        compute_metrics=engine.token_accuracy, preprocess_logits_for_metrics=engine._argmax_logits)
    trainer.trained_logits_only = True
    found = {}
    # Chunked first: the logits' passes free up to 1.5 GB that a later pass could reuse unseen.
    for way, fused in (("chunked", FusedCausalLMLoss.for_model(model, torch.float32)), ("logits", None)):
        trainer.fused_loss = fused
        trainer.evaluate()  # the first pass settles what stays allocated
        memory.reset_peak()
        before = memory.measured_peak()
        metrics = trainer.evaluate()
        found[way] = {"growth": memory.measured_peak() - before, "loss": metrics["eval_loss"],
                      "accuracy": metrics["eval_accuracy"]}
    print(json.dumps(found))
""")


@pytest.mark.slow
@pytest.mark.skipif(hardware.cuda_available(), reason="the chunked validation is the CPU's")
def test_validation_on_a_cpu_keeps_no_logits(shared_data, tmp_path):
    """SmolLM2-135M validating 8 x 256 Alpaca rows (about 2,000 trained positions) in a fresh
    process: with the logits of the trained positions the peak grows by their size (2,000 x
    49k fp32, twice: logits and log-softmax); without them (lm_loss's chunks, what training on
    a CPU does) by little, with the same loss and token accuracy."""
    proc = subprocess.run([sys.executable, "-c", VALIDATE, str(shared_data)], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["logits"]["growth"] > 500e6, found
    assert found["chunked"]["growth"] < 200e6, found
    assert found["chunked"]["loss"] == pytest.approx(found["logits"]["loss"], rel=1e-5)
    assert found["chunked"]["accuracy"] == found["logits"]["accuracy"]


def test_peak_is_the_process_own_not_its_parents():
    """Linux carries a peak resident size across exec; a child of a big process must not report it."""
    import numpy as np
    big = np.ones(1_500_000_000 // 8)  # 1.5 GB held by this (parent) process
    code = "from nb_finetune import memory; memory.reset_peak(); print(memory.measured_peak())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert int(proc.stdout.strip().splitlines()[-1]) < 1_000_000_000, proc.stderr[-2000:]
    del big


KEPT = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from nb_finetune import memory
    rss = lambda: psutil.Process().memory_info().rss
    with memory.freed_memory_kept(sys.argv[1] == "on") as kept:
        # 1 GB written, as a step's activations: 16 MB blocks and 48 MB ones (above glibc's
        # 32 MB mmap ceiling, as the fp32 loss chunks are)
        blocks = [torch.ones(2 ** 22 * (1 + 2 * (i % 2))) for i in range(32)]
        held = rss()
        del blocks
        freed = rss()
    print(json.dumps({"kept": kept, "held": held, "freed": freed, "after": rss()}))
""")


@pytest.mark.parametrize("how", ["on", "off", "binder"])
def test_freed_memory_is_kept_while_training_and_given_back_after(how):
    """In a fresh process each (glibc's settings last for the process): 1 GB freed inside the
    context stays for the next step to reuse, and is returned when it ends; off, or under Binder's
    own allocator settings, glibc returns it at once."""
    env = PLAIN_ENV | ({"MALLOC_MMAP_THRESHOLD_": "131072"} if how == "binder" else {})
    proc = subprocess.run([sys.executable, "-c", KEPT, "off" if how == "off" else "on"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = 2 ** 30
    if platform.libc_ver()[0] != "glibc":  # another allocator: nothing to set
        assert not got["kept"]
        return
    assert got["kept"] == (how == "on"), got
    if how == "on":
        assert got["held"] - got["freed"] < 0.1 * gb, got   # kept
    else:
        assert got["held"] - got["freed"] > 0.9 * gb, got   # returned at once
    assert got["held"] - got["after"] > 0.9 * gb, got       # and after, given back either way


HUGE = textwrap.dedent("""
    import json, os
    from nb_finetune import memory  # first, as a notebook or the command line does: torch decides at its first allocation
    import torch
    x = torch.ones(64 * 2**20)  # 256 MB, written
    print(json.dumps({"setting": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge": memory.resident_bytes("AnonHugePages")}))
""")


def _huge_pages_offered() -> str:
    try:
        with open(THP_SETTING) as f:
            return f.read().split("[")[1].split("]")[0]  # always, madvise or never
    except (OSError, IndexError):
        return "never"


@pytest.mark.parametrize("how", ["default", "turned off", "binder"])
def test_large_tensors_sit_on_huge_pages_unless_turned_off(how):
    """In a fresh process each: importing nb_finetune puts torch's large CPU tensors on
    transparent huge pages where the kernel gives them on request; THP_MEM_ALLOC_ENABLE=0, or
    Binder's allocator settings, leave them on 4 KB pages."""
    env = {k: v for k, v in PLAIN_ENV.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env |= {"turned off": {"THP_MEM_ALLOC_ENABLE": "0"}, "binder": {"MALLOC_MMAP_THRESHOLD_": "131072"}}.get(how, {})
    proc = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    offered = _huge_pages_offered()
    if offered == "never":
        assert got["setting"] == ("0" if how == "turned off" else None), got
        return
    assert got["setting"] == {"default": "1", "turned off": "0", "binder": None}[how], got
    if how == "default":
        assert got["huge"] > 200 * 2 ** 20, got   # most of the 256 MB
    elif offered == "madvise":                    # ("always" gives huge pages whatever torch asks)
        assert got["huge"] < 16 * 2 ** 20, got


def test_huge_pages_only_where_the_kernel_offers_them(tmp_path, monkeypatch):
    from nb_finetune.memory import huge_pages_for_tensors
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert not huge_pages_for_tensors(str(setting))
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert not huge_pages_for_tensors(str(tmp_path / "missing"))  # not Linux
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    setting.write_text("always [madvise] never\n")
    assert huge_pages_for_tensors(str(setting))
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


GPU_RUN = textwrap.dedent("""
    import json, sys
    from nb_finetune import load_preset
    from nb_finetune.job import Session
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
