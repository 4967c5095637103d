"""Training speed: nb_finetune vs a plain TRL script, side by side in one run.

What it prints (figures, never pass/fail):
1. This machine's matmul peak, measured: bf16 and fp32 TFLOP/s (best of a few square sizes).
2. Training throughput on SmolLM2-135M-Instruct, LoRA r16 on every linear layer, batch 8,
   the same optimizer steps, learning rate and seed, for each data set (Alpaca demo, SST-2):
   - nb_finetune: its engine with its defaults (bf16 autocast where the CPU has bf16,
     length-grouped batches, dynamic padding to a multiple of 8);
   - TRL: `SFTTrainer` + `DataCollatorForCompletionOnlyLM` (trl 0.19.1, its defaults, fp32),
     fed the same rendered chat strings, as a hand-written script would do.
   - nb_finetune packed: the same with train.packing, over the same rows (one epoch, so
     fewer optimizer steps of fuller rows).
   - nb_finetune peft layers: the same with peft's own LoRA layers in place of
     modeling.FastLoraLinear (what it gains, and that it keeps the validation loss).
   Runs alternate (ours, ours packed, ours with peft's layers, TRL, ours, ...) in this
   process; the median of the repeats is reported. Tokens/s counts the non-padding tokens of the batches each trainer consumed (a
   padded position is computed but is not work anyone asked for) over the wall time of
   `trainer.train()`. Quality: each trained model's loss on the same validation rows, on the
   response tokens only, computed the same way (fp32) for both.
3. Model FLOPs utilisation of each: (4 N + 6 N_lora + 6 L d s) FLOPs per non-padding token
   (a frozen base: 2N forward, 2N backward to the activations; the adapters' own gradients;
   causal attention over rows of mean length s) times tokens/s, over the measured bf16 peak
   (and the fp32 peak, which is the fair ceiling for an fp32 run).
4. Time to the first training step of `nb-finetune demo` from a cold process with a warm asset
   cache, with the time each stage's message appeared (measured before the other parts).
5. Tokenization throughput: `tokenize_frame` (render, offsets, masks) vs the tokenizer's own
   batched call on the same strings (no masks), rows/s; and with the token cache, the first
   time (tokenize and write) and the same rows again (read back).
6. Evaluation: the validation pass and the test label scores with the logits of every
   position vs only those that predict a trained token (what nb_finetune does), and on a CPU
   validation with those logits vs without them (lm_loss, what training does there), seconds
   and the results side by side.
7. The training loss: one training step with the loss from the model's logits (transformers)
   vs without them (nb_finetune.lm_loss), seconds per step, page faults, and the loss of
   each on the same weights and dropout masks.
8. Attention: one training step on 8 SST-2 rows with torch's sdpa vs the short-row attention
   (nb_finetune.attention), seconds per step, and each one's adapter gradients' distance to
   fp32's and to sdpa's.
9. Where a training step's time goes: one step on 8 x 256 Alpaca rows and on 8 SST-2 rows
   under torch's profiler, by kind of work (the base's matmuls, the adapters' matmuls, LoRA's
   dropout, attention, the loss, the optimizer, elementwise and the rest): what is left to
   speed up, on the machine at hand.
10. The allocator between steps: the same training steps, and the demo's evaluation, in fresh
   processes, alternating, with glibc's defaults, with the memory each step frees kept for the
   next (memory.freed_memory_kept), and with that memory on transparent huge pages as well
   (memory.huge_pages_for_tensors; what the engine does on a CPU): seconds (training from
   step 2 on), page faults, peak resident memory, what the process holds once done, and how
   much of it sat on huge pages.
Everything in this process runs with the engine's huge pages (nb_finetune is imported before
torch allocates anything), the TRL script included; THP_MEM_ALLOC_ENABLE=0 runs it without.

Run from the repository root (the default takes about 25 minutes on a 2-core CPU, and part 10
about 35 more at 20 steps, 20 at `--steps 9`; `--skip allocator` leaves it out):
    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --steps 4 --repeats 1 --data alpaca   # a quick try
Peak memory of LoRA vs QLoRA is printed by benchmarks/gpu_check.py (RSS on a CPU), and bias
probe scoring throughput by benchmarks/crows_pairs_probe.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

import nb_finetune  # noqa: F401  before torch allocates: its CPU tensors on huge pages, as the engine runs
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
SEED = 42
LR = 2e-4
RESPONSE_TEMPLATE = "<|im_start|>assistant\n"  # where TRL's collator starts the trained tokens
# Alternated in this order; "packed" is nb_finetune with train.packing on, over the same rows;
# "peft layers" is nb_finetune with peft's own LoRA layers in place of modeling.FastLoraLinear.
TRAINERS = ("nb_finetune", "nb_finetune packed", "nb_finetune peft layers", "trl")


# -- 1. the machine ---------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def flop_rate(step, flops: float, seconds: float) -> float:
    """FLOP/s of `step` (doing `flops` each call), run for about `seconds` after one warm-up
    call (kernel choice, caches)."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    step()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
        if count % 10 == 0:
            sync()
    sync()
    return flops * count / (time.perf_counter() - start)


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s of a square matmul over a few sizes (on a CPU, on every thread torch uses).
    The sizes run twice: a first reading can come low (clock ramp, fresh pages), and an
    under-read peak would overstate MFU (on a Xeon the model's own shapes once read 1.7x it)."""
    best = 0.0
    for n in ((1024, 2048, 4096) + ((8192,) if DEVICE == "cuda" else ())) * 2:
        a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
        best = max(best, flop_rate(lambda a=a, b=b: a @ b, 2 * n ** 3, seconds / 3))
    return best


def model_shape_rate(dtype: torch.dtype, rows: int, seconds: float = 1.0) -> float:
    """FLOP/s of one SmolLM2-135M layer's frozen-base matmuls at `rows` tokens: each projection
    forward (x W^T) and backward to its input (dy W), the work that 4N per token counts. The
    square-matmul peak is the ceiling MFU is measured against; this says how near to it the
    model's own shapes (576 wide, 1,536 in the MLP) can get on this machine."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
    weights = [torch.randn(o, i, dtype=dtype, device=DEVICE) for o, i in shapes]
    inputs = [torch.randn(rows, i, dtype=dtype, device=DEVICE) for _, i in shapes]
    grads = [torch.randn(rows, o, dtype=dtype, device=DEVICE) for o, _ in shapes]

    def layer():
        for w, x, g in zip(weights, inputs, grads):
            torch.nn.functional.linear(x, w)
            g @ w
    return flop_rate(layer, sum(2 * 2 * rows * o * i for o, i in shapes), seconds)


# -- data -------------------------------------------------------------------------------------

def load_rows(name: str, n_train: int, n_val: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Normalised {prompt, completion} rows and the task kind our Formatter is built for."""
    from nb_finetune import config, data
    if name == "alpaca":
        raw = pd.DataFrame(json.loads((SHARED / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
        frame, task = data.normalize(raw, config.DataConfig(task="completion")), "completion"
    else:  # sst2: the sentence and a one-word answer
        raw = pd.read_csv(SHARED / "sst2" / "train.tsv", sep="\t")
        frame = data.normalize(raw, config.DataConfig(task="classification", label_names={"0": "negative",
                                                                                           "1": "positive"}))
        task = "classification"
    frame = frame.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    return frame.iloc[:n_train], frame.iloc[n_train:n_train + n_val], task


# -- the two trainers -----------------------------------------------------------------------

class Counting:
    """Wraps a collator and counts the non-padding tokens of every batch it makes."""

    def __init__(self, collator):
        self.collator, self.tokens, self.padded, self.rows = collator, 0, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.tokens += int(mask.sum())
        self.padded += mask.numel()
        # original rows: a packed row holds several, each starting at position 0
        self.rows += int(((batch["position_ids"] == 0) & (mask == 1)).sum()) if "position_ids" in batch \
            else mask.shape[0]
        return batch


def run_ours(train: pd.DataFrame, fmt, args, out: str, packing: bool = False,
             fast_lora: bool = True) -> tuple[dict, object]:
    from nb_finetune import config, engine, hardware, modeling
    from nb_finetune.tokenization import CompletionOnlyCollator, pack, tokenize_frame
    mcfg = config.ModelConfig(lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    # Packed, the same rows (one epoch) take fewer steps: run the epoch rather than the step count.
    tcfg = config.TrainConfig(output_dir=out, max_steps=0 if packing else args.steps, epochs=1.0,
                              learning_rate=LR, batch_size=args.batch_size,
                              max_length=args.max_length, eval_steps=10**6, save_steps=10**6,
                              logging_steps=max(1, args.steps // 4), warmup_ratio=0.0, seed=args.seed)
    tok = fmt.tokenizer
    dataset, _ = tokenize_frame(train, fmt)
    if packing:
        dataset = pack(dataset, args.max_length)
    import transformers
    transformers.set_seed(args.seed)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    if not fast_lora:  # peft's own layers: each adapter casts, masks and multiplies on its own
        from peft.tuners.lora.layer import Linear
        for layer in model.modules():
            if isinstance(layer, modeling.FastLoraLinear):
                layer.__class__ = Linear
    collator = Counting(CompletionOnlyCollator(tok.pad_token_id, tcfg.pad_to_multiple_of))
    precision = hardware.compute_dtype(mcfg.compute_dtype)
    start = time.perf_counter()
    result = engine.train(model, dataset, None, collator, tcfg, precision=precision)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": collator.tokens, "padded": collator.padded, "rows": collator.rows,
            "steps": result.global_step, "precision": precision}, model


def run_trl(train: pd.DataFrame, fmt, args, out: str) -> tuple[dict, object]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from datasets import Dataset
    from trl import DataCollatorForCompletionOnlyLM, SFTConfig, SFTTrainer
    from nb_finetune import modeling
    path = modeling.resolve("smollm2-135m-instruct", progress=lambda m: None)
    tok = fmt.tokenizer
    texts = [fmt.render(row)[0] for row in train.to_dict(orient="records")]
    import transformers
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path)  # fp32, as loaded by default
    collator = Counting(DataCollatorForCompletionOnlyLM(response_template=RESPONSE_TEMPLATE, tokenizer=tok))
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=LR, max_length=args.max_length, logging_steps=max(1, args.steps // 4),
                    save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
                    dataset_text_field="text", disable_tqdm=True,
                    # The baseline is fp32. TRL 0.19's SFTConfig turns bf16 autocast on unless told
                    # otherwise (and on a CPU without bf16 torch then emulates it, 30x slower).
                    bf16=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok, data_collator=collator,
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": collator.tokens, "padded": collator.padded, "rows": collator.rows,
            "steps": trainer.state.global_step, "precision": "bfloat16" if cfg.bf16 else "float32"}, \
        trainer.model


@torch.no_grad()
def validation_loss(model, features: list[dict], batch_size: int = 8) -> float:
    """Mean cross-entropy over the response tokens of `features`, fp32, the same for both."""
    from nb_finetune.tokenization import IGNORE, CompletionOnlyCollator
    model.eval()
    collate = CompletionOnlyCollator(pad_token_id=0, pad_to_multiple_of=None)
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(features[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE).sum())
    return total / count


def flops_per_token(model, mean_length: float) -> float:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = total - lora
    return 4 * base + 6 * lora + 6 * cfg.num_hidden_layers * cfg.hidden_size * mean_length


def compare_training(name: str, args, peaks: dict) -> list[dict]:
    train, val, task = load_rows(name, args.steps * args.batch_size, args.val_rows)
    labels = ["negative", "positive"] if task == "classification" else []
    rows = []
    # On a GPU each trainer's first run in the process loads its kernels (up to 2.5x slower on an
    # H200): run each once untimed there. A CPU has nothing to load.
    warmups = 1 if DEVICE == "cuda" else 0
    trainers = [t.strip() for t in args.trainers.split(",")]
    # TRL is fed the strings our formatter renders, and validation uses its encoding: build it once.
    from nb_finetune import config, modeling
    from nb_finetune.tokenization import Formatter
    fmt = Formatter.build(modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None), task, labels,
                          args.max_length)
    for repeat in range(-warmups, args.repeats):
        for who in trainers:
            with tempfile.TemporaryDirectory() as out:
                if who == "trl":
                    figures, model = run_trl(train, fmt, args, out)
                else:
                    figures, model = run_ours(train, fmt, args, out, packing=who.endswith("packed"),
                                              fast_lora=not who.endswith("peft layers"))
            if repeat < 0:
                del model
                continue
            val_features = [fmt.encode(r) for r in val.to_dict(orient="records")]
            mean_length = figures["tokens"] / figures["rows"]  # causal attention runs within each original row
            tps = figures["tokens"] / figures["seconds"]
            achieved = tps * flops_per_token(model, mean_length)
            rows.append({"data": name, "trainer": who, "repeat": repeat, "precision": figures["precision"],
                         "steps": figures["steps"], "train s": figures["seconds"], "tokens": figures["tokens"],
                         "padding share": 1 - figures["tokens"] / figures["padded"], "tokens/s": tps,
                         "MFU bf16 peak": achieved / peaks["bfloat16"], "MFU fp32 peak": achieved / peaks["float32"],
                         "val loss": validation_loss(model, val_features)})
            widths = {c: 24 if c == "trainer" else 13 for c in rows[-1]}  # the same columns row after row
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=repeat == 0 and who == trainers[0],
                                                    col_space=widths, float_format=lambda v: f"{v:.4g}"), flush=True)
            del model
    return rows


def lora_model():
    """SmolLM2-135M-Instruct with the benchmark's LoRA, initialised with the seed, training."""
    from nb_finetune import config, modeling
    mcfg = config.ModelConfig(lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    torch.manual_seed(SEED)
    return modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg,
                             "completion").train()


def longest_batch(tok, name: str, n_rows: int, args) -> dict:
    """The args.batch_size longest of a data set's first n_rows, tokenized and padded as training does."""
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, tokenize_frame
    train, _, task = load_rows(name, n_rows, 0)
    labels = ["negative", "positive"] if name == "sst2" else []
    dataset, _ = tokenize_frame(train, Formatter.build(tok, task, labels, args.max_length))
    longest = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))[:args.batch_size]
    return CompletionOnlyCollator(tok.pad_token_id, 8)([dataset[i] for i in longest])


# -- 4. time to first step -------------------------------------------------------------------

def time_to_first_step() -> pd.DataFrame:
    """Run `nb-finetune demo` in a fresh process; time each line it prints until step 1."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-u", "-m", "nb_finetune", "demo", "--output", out,
               "--set", "train.max_steps=2", "--set", "train.logging_steps=1"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        marks = []
        for line in proc.stdout:
            marks.append({"seconds": round(time.perf_counter() - start, 2), "printed": line.rstrip()[:90]})
            if re.search(r"step\s+1/", line):
                break
        proc.kill()
        proc.wait()
    return pd.DataFrame(marks)


# -- 5. tokenization --------------------------------------------------------------------------

def tokenization_speed(args) -> pd.DataFrame:
    from nb_finetune import config, modeling
    from nb_finetune.tokenization import Formatter, tokenize_frame
    train, _, task = load_rows("alpaca", 10**9, 0)
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    fmt = Formatter.build(tok, task, [], args.max_length)
    start = time.perf_counter()
    _, stats = tokenize_frame(train, fmt)
    ours = time.perf_counter() - start
    texts = [fmt.render(r)[0] for r in train.to_dict(orient="records")]
    start = time.perf_counter()
    tok(texts, add_special_tokens=False)
    plain = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        cached = []
        for _ in range(2):  # the first fills the cache, the second reads it back
            start = time.perf_counter()
            tokenize_frame(train, fmt, cache=Path(cache))
            cached.append(time.perf_counter() - start)
    return pd.DataFrame([
        {"what": "tokenize_frame: render + offsets + masks + truncation", "rows": len(train), "rows/s": len(train) / ours,
         "tokens/s": stats.tokens / ours},
        {"what": "tokenizer(texts) batched, ids only (reference)", "rows": len(train), "rows/s": len(train) / plain,
         "tokens/s": stats.tokens / plain},
        {"what": "tokenize_frame, token cache empty (tokenize + write)", "rows": len(train),
         "rows/s": len(train) / cached[0], "tokens/s": stats.tokens / cached[0]},
        {"what": "tokenize_frame, same rows again (read from the token cache)", "rows": len(train),
         "rows/s": len(train) / cached[1], "tokens/s": stats.tokens / cached[1]}])


# -- 6. evaluation -----------------------------------------------------------------------------

def evaluation_speed(args) -> pd.DataFrame:
    """Validation (the trainer's evaluate) and test label scoring: every position's logits vs
    only the positions that predict a trained token, and each (prompt, label) sequence whole vs
    each prompt once with the labels continuing from it; alternated, best of 2 each."""
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainingArguments
    from nb_finetune import config, data, engine, hardware, modeling
    from nb_finetune.evaluation import score_labels, sequence_logprobs
    from nb_finetune.lm_loss import FusedCausalLMLoss
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, tokenize_frame
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    # Evaluated only: frozen, as the base of an adapted model is (what lm_loss requires).
    model = AutoModelForCausalLM.from_pretrained(modeling.resolve("smollm2-135m-instruct", progress=lambda m: None)
                                                 ).requires_grad_(False)
    precision = hardware.compute_dtype("auto")
    collator = CompletionOnlyCollator(tok.pad_token_id)
    rows = []

    def best_of_two(runs: dict) -> tuple[dict, dict]:
        times, found = {k: [] for k in runs}, {}
        for _ in range(2):
            for k, fn in runs.items():
                start = time.perf_counter()
                found[k] = fn()
                times[k].append(time.perf_counter() - start)
        return {k: min(v) for k, v in times.items()}, found

    def row(what, before, after, times, same):
        return {"what": what, "before": before, "before s": times[0], "after": after, "after s": times[1],
                "speed-up": times[0] / times[1], "same result": same}

    for name in ("alpaca", "sst2"):
        _, val, task = load_rows(name, 0, args.val_rows)
        labels = ["negative", "positive"] if task == "classification" else []
        fmt = Formatter.build(tok, task, labels, args.max_length)
        dataset, _ = tokenize_frame(val, fmt)
        with tempfile.TemporaryDirectory() as out:
            trainer = engine._trainer_class()(
                model=model, eval_dataset=dataset, data_collator=collator, compute_metrics=engine.token_accuracy,
                preprocess_logits_for_metrics=engine._argmax_logits,
                args=TrainingArguments(output_dir=out, use_cpu=DEVICE == "cpu", report_to="none",
                                       per_device_eval_batch_size=args.batch_size, bf16=precision == "bfloat16",
                                       bf16_full_eval=False, disable_tqdm=True))
            trainer.remove_callback(PrinterCallback)

            # On a CPU training also validates without logits (chunked, lm_loss): a third variant.
            chunked = FusedCausalLMLoss.for_model(model, getattr(torch, precision)) if DEVICE == "cpu" else None

            def validate(selective, without_logits=False, trainer=trainer, chunked=chunked):
                trainer.trained_logits_only, trainer.fused_loss = selective, chunked if without_logits else None
                return trainer.evaluate()
            variants = {False: lambda: validate(False), True: lambda: validate(True)}
            if chunked is not None:
                variants["chunked"] = lambda: validate(True, without_logits=True)
            times, found = best_of_two(variants)
        def same(a, b, found=found):
            return (f"loss {found[a]['eval_loss']:.5f} vs {found[b]['eval_loss']:.5f}, "
                    f"accuracy {found[a]['eval_accuracy']:.4f} vs {found[b]['eval_accuracy']:.4f}")
        rows.append(row(f"validation, {name}, {len(dataset)} rows", "every position", "trained positions",
                        (times[False], times[True]), same(False, True)))
        if chunked is not None:
            rows.append(row(f"validation, {name}, {len(dataset)} rows", "trained positions, logits",
                            "trained positions, no logits (lm_loss)", (times[True], times["chunked"]),
                            same(True, "chunked")))
        if labels:  # the test metric: each label's log-likelihood after each prompt
            features = fmt.encode_many([r | {"label": lab} for r in val.to_dict(orient="records") for lab in labels])
            times, scores = best_of_two({s: lambda s=s, f=features: sequence_logprobs(model, f, collator, args.batch_size,
                                                                                    precision, selective=s)
                                         for s in (False, True)})
            rows.append(row(f"label scores, {name}, {len(val)} rows x {len(labels)} labels", "every position",
                            "trained positions", (times[False], times[True]),
                            f"largest difference {abs(scores[False] - scores[True]).max():.1e} nats"))
    # Label scoring on the demo's test split (IMDB reviews, most cut to 256 tokens) and on SST-2:
    # the whole sequences (trained positions only) against the prompt once per row.
    demo = config.load_preset("demo")
    prep = data.prepare(demo.data, None)
    sst2_val = load_rows("sst2", 0, args.val_rows)[1]
    for name, frame, fmt in (
            ("demo test split (IMDB)", prep.splits["test"],
             Formatter.build(tok, "classification", prep.labels, demo.train.max_length, instruction=demo.data.instruction)),
            ("sst2", sst2_val, Formatter.build(tok, "classification", ["negative", "positive"], args.max_length))):
        labels = list(fmt.labels)
        times, scores = best_of_two({s: lambda s=s, fmt=fmt, frame=frame, labels=labels: score_labels(
            model, fmt, frame, labels, collator, args.batch_size, precision, shared_prompt=s) for s in (False, True)})
        rows.append(row(f"label scores, {name}, {len(frame)} rows x {len(labels)} labels", "whole sequences",
                        "prompt once", (times[False], times[True]),
                        f"largest difference {abs(scores[False] - scores[True]).max():.1e} nats, same picks: "
                        f"{(scores[False].argmax(1) == scores[True].argmax(1)).all()}"))
    return pd.DataFrame(rows)


def loss_speed(args) -> pd.DataFrame:
    """One training step (forward, backward, AdamW) on 8 Alpaca rows, SmolLM2-135M with LoRA,
    the trainer's loss from the model's logits vs without them (lm_loss): seconds per step,
    alternated, best of 3 each, and the loss of the first step of each."""
    import resource
    from transformers import TrainingArguments
    from nb_finetune import config, engine, hardware, modeling
    from nb_finetune.lm_loss import FusedCausalLMLoss
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    batch = longest_batch(tok, "alpaca", 160, args)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    precision = hardware.compute_dtype("auto")
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    fused = FusedCausalLMLoss.for_model(model, getattr(torch, precision))
    with tempfile.TemporaryDirectory() as out:
        trainer = engine._trainer_class()(model=model, args=TrainingArguments(output_dir=out, use_cpu=True,
                                                                            report_to="none"))
    trainer.trained_logits_only = True
    times, faults, first = {False: [], True: []}, {False: [], True: []}, {}
    with engine.frozen_weights_in(model, precision):
        for round in range(4):  # the first warms up, on the same weights and dropout masks for both
            for with_fused in (False, True):
                trainer.fused_loss = fused if with_fused else None
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                with torch.random.fork_rng(enabled=round == 0), \
                        torch.autocast("cpu", dtype=getattr(torch, precision), enabled=precision != "float32"):
                    if round == 0:
                        torch.manual_seed(SEED)
                    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(trained))
                loss.backward()
                if round:
                    optimizer.step()
                optimizer.zero_grad()
                times[with_fused].append(time.perf_counter() - start)
                faults[with_fused].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                first.setdefault(with_fused, loss.item())
    return pd.DataFrame([{"loss": who, "step s": min(times[f][1:]), "page faults": sorted(faults[f][1:])[1],
                          "loss, same weights": first[f]}
                         for f, who in ((False, "from the logits (transformers)"), (True, "without logits (lm_loss)"))])


def attention_speed(args) -> pd.DataFrame:
    """One training step (forward and backward) on 8 SST-2 rows (about 80 tokens), SmolLM2-135M
    with LoRA, attention by torch's sdpa vs nb_finetune's short-row attention: seconds per
    step, alternated, best of 3 each, and how far each one's adapter gradients are from fp32's
    (relative distance; the same dropout masks)."""
    from nb_finetune import attention, config, engine, hardware, modeling
    from nb_finetune.lm_loss import FusedCausalLMLoss
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, tokenize_frame
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    train, _, task = load_rows("sst2", args.batch_size, 0)
    dataset, _ = tokenize_frame(train, Formatter.build(tok, task, ["negative", "positive"], args.max_length))
    batch = CompletionOnlyCollator(tok.pad_token_id, 8)([dataset[i] for i in range(len(dataset))])
    keep, following = engine.trained_positions(batch["labels"])
    inputs = {**batch, "logits_to_keep": keep, "shift_labels": following}
    precision = hardware.compute_dtype("auto")
    model = lora_model()
    fused = FusedCausalLMLoss.for_model(model, getattr(torch, precision))

    def step(short: bool, autocast: bool = True):
        model.zero_grad()
        with torch.random.fork_rng(), attention.for_training(model) if short else torch.enable_grad(), \
                torch.autocast("cpu", dtype=getattr(torch, precision), enabled=autocast and precision != "float32"), \
                fused.swapped_in() if fused else torch.enable_grad():
            torch.manual_seed(SEED)  # the same dropout masks in every pass
            start = time.perf_counter()
            model(**inputs).loss.backward()
        return time.perf_counter() - start, torch.cat([p.grad.flatten() for p in model.parameters()
                                                       if p.requires_grad])

    _, exact = step(False, autocast=False)
    times, found = {False: [], True: []}, {}
    with engine.frozen_weights_in(model, precision):
        for round in range(4):  # the first warms up
            for short in (False, True):
                seconds, found[short] = step(short)
                times[short].append(seconds)
    relative = lambda a, b: float((a - b).norm() / b.norm())
    return pd.DataFrame([{"attention": who, "length": batch["input_ids"].shape[1], "step s": min(times[f][1:]),
                          "gradient distance to fp32": relative(found[f], exact),
                          "to sdpa's": relative(found[f], found[False])}
                         for f, who in ((False, "torch sdpa"), (True, "short-row (nb_finetune.attention)"))])


# -- 9. where a step's time goes ---------------------------------------------------------------

# Time inside these (forward ranges named by the benchmark, autograd's backward nodes) is booked
# to them; the rest by the kind of operator.
# FastDropout's masks: its own forward where peft's layers call it, zero_dropped (a masked fill,
# MaskedFillBackward0 backward) where FastLoraLinear does.
STEP_PARTS = {"FastDropout": "LoRA dropout masks", "_ScaledMaskBackward": "LoRA dropout masks",
              "MaskedFillBackward0": "LoRA dropout masks",
              "_ShortAttention": "attention", "_ShortAttentionBackward": "attention",
              "_LinearCrossEntropy": "vocabulary projection and loss",
              "_LinearCrossEntropyBackward": "vocabulary projection and loss",
              "optimizer": "optimizer (fused AdamW)"}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def _step_part(event) -> str:
    node = event
    while node is not None:
        name = node.name.replace("autograd::engine::evaluate_function: ", "")
        if name in STEP_PARTS:
            return STEP_PARTS[name]
        node = node.cpu_parent
    if "attention" in event.name:
        return "attention"
    if event.name in MATMULS:
        shapes = [s for s in event.input_shapes if s]
        # FastLoraLinear multiplies by q, k and v's A matrices stacked (3 r), gate and up's (2 r)
        ranks = {LORA["r"], 2 * LORA["r"], 3 * LORA["r"]}
        return "LoRA matmuls (rank in the shape)" if any(ranks & set(s) for s in shapes) else "base matmuls"
    return "elementwise and the rest"


def step_profile(args) -> pd.DataFrame:
    """One training step as nb_finetune trains (frozen weights in the compute dtype, autocast,
    short-row attention, the loss without logits, fused AdamW, freed memory kept) on the 8
    longest of 160 Alpaca rows and on 8 SST-2 rows, under torch's profiler: seconds of the step
    by kind of work. The matmuls with the LoRA rank in their shape are the adapters'; LoRA's
    dropout, attention and the loss are booked whole (their own matmuls and elementwise work)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from nb_finetune import attention, config, engine, hardware, memory, modeling
    from nb_finetune.lm_loss import FusedCausalLMLoss
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    precision = hardware.compute_dtype("auto")
    model = lora_model()
    fused = FusedCausalLMLoss.for_model(model, getattr(torch, precision))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)
    dropout_forward, zero_dropped = modeling.FastDropout.forward, modeling.FastDropout.zero_dropped

    def named(method):
        def recorded(self, x):
            with record_function("FastDropout"):
                return method(self, x)
        return recorded

    modeling.FastDropout.forward, modeling.FastDropout.zero_dropped = named(dropout_forward), named(zero_dropped)
    rows = []
    try:
        for name in ("alpaca", "sst2"):
            batch = longest_batch(tok, name, 160 if name == "alpaca" else args.batch_size, args)
            keep, following = engine.trained_positions(batch["labels"])
            inputs = {**batch, "logits_to_keep": keep, "shift_labels": following}

            def step(inputs=inputs):
                with attention.for_training(model), fused.swapped_in() if fused else torch.enable_grad(), \
                        torch.autocast("cpu", dtype=getattr(torch, precision), enabled=precision != "float32"):
                    loss = model(**inputs).loss
                loss.backward()
                with record_function("optimizer"):
                    optimizer.step()
                optimizer.zero_grad()

            # As engine.train on a CPU: memory a step frees is kept for the next, so the profiled
            # step does not pay for fresh pages (with glibc's defaults its fp32 Alpaca step's
            # elementwise share was 17.6%, against 10.4% once the memory had been touched).
            with engine.frozen_weights_in(model, precision), memory.freed_memory_kept(DEVICE == "cpu"):
                for _ in range(2):  # warm-up: the kernels' own set-up, memory touched for the first time
                    step()
                start = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    step()
                seconds = time.perf_counter() - start
            ops: dict = {}  # part -> operator -> seconds: the largest operators are printed beside each part
            for event in prof.events():
                by_op = ops.setdefault(_step_part(event), {})
                by_op[event.name] = by_op.get(event.name, 0.0) + event.self_cpu_time_total / 1e6
            parts = {part: sum(by_op.values()) for part, by_op in ops.items()}
            total = sum(parts.values())
            shape = "x".join(map(str, batch["input_ids"].shape))
            for part, t in sorted(parts.items(), key=lambda kv: -kv[1]):
                largest = sorted(ops[part].items(), key=lambda kv: -kv[1])[:4]
                rows.append({"data": f"{name} {shape}", "part": part, "seconds": t, "share": t / total,
                             "largest operators, s": ", ".join(f"{op.replace('aten::', '')} {v:.2f}"
                                                               for op, v in largest if v >= 0.005)})
            rows.append({"data": f"{name} {shape}", "part": f"the step (wall clock; profiled: {total:.2f} s)",
                         "seconds": seconds, "share": 1.0, "largest operators, s": ""})
    finally:
        modeling.FastDropout.forward, modeling.FastDropout.zero_dropped = dropout_forward, zero_dropped
    return pd.DataFrame(rows)


# -- 10. the allocator between steps -----------------------------------------------------------

def allocator_child(what: str, keep: bool, args) -> dict:
    """In a fresh process, with freed memory kept between steps or glibc's defaults: train
    args.steps steps as the engine does (what: alpaca or sst2) and time steps 2 on, or evaluate
    the demo's model on its test split (what: demo-eval, the tuned model only); seconds, page
    faults, the peak resident memory, what the process holds once done, and the most of it on
    huge pages at a logged step (for the evaluation: once done)."""
    import resource

    import psutil
    from nb_finetune import config, engine, evaluation, hardware, load_preset, memory, modeling
    from nb_finetune.job import Session
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, tokenize_frame

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def huge_gb() -> float:  # resident memory on transparent huge pages
        huge = memory.resident_bytes("AnonHugePages")
        return float("nan") if huge is None else huge / 1e9

    with tempfile.TemporaryDirectory() as out:
        if what == "demo-eval":
            session = Session(load_preset("demo").with_overrides({"eval.baselines": False, "train.output_dir": out}),
                              progress=lambda m: None)
            session.prepare_data()
            session.tokenize()
            session.load_model()
            memory.reset_peak()
            start, before = time.perf_counter(), faults()
            evaluation.evaluate(session.model, session.formatter, session.prep, session.objective, session.cfg.eval,
                                session.cfg.train.batch_size, session.precision, lambda m: None,
                                keep_freed_memory=keep)
            marks = [(start, before), (time.perf_counter(), faults())]
            huge = [huge_gb()]
        else:
            train, _, task = load_rows(what, args.steps * args.batch_size, 0)
            tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
            fmt = Formatter.build(tok, task, ["negative", "positive"] if what == "sst2" else [], args.max_length)
            dataset, _ = tokenize_frame(train, fmt)
            marks, huge = [], []

            class Mark(engine.Callback):
                def on_log(self, row, history):
                    marks.append((time.perf_counter(), faults()))
                    huge.append(huge_gb())

            model = lora_model()
            tcfg = config.TrainConfig(output_dir=out, max_steps=args.steps, learning_rate=LR,
                                      batch_size=args.batch_size, max_length=args.max_length, eval_steps=10**6,
                                      save_steps=10**6, logging_steps=1, warmup_ratio=0.0, seed=args.seed)
            memory.reset_peak()
            engine.train(model, dataset, None, CompletionOnlyCollator(tok.pad_token_id, 8), tcfg,
                         callbacks=[Mark()], precision=hardware.compute_dtype("auto"), keep_freed_memory=keep)
    return {"seconds": [b[0] - a[0] for a, b in itertools.pairwise(marks)],
            "faults": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
            "peak GB": memory.measured_peak() / 1e9, "after GB": psutil.Process().memory_info().rss / 1e9,
            "huge pages GB": max(huge)}


def allocator_speed(args) -> pd.DataFrame:
    """Steps 2 to args.steps of the same training (each data set), and the demo's evaluation,
    with glibc's defaults, with freed memory kept, and with freed memory kept on huge pages
    (memory.huge_pages_for_tensors), each in a fresh process (glibc's settings and torch's
    huge-page choice last for the process), alternating, args.repeats times."""
    rows = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    # how -> (keep freed memory, THP_MEM_ALLOC_ENABLE): the engine now does the last
    ways = {"glibc defaults": (False, "0"), "freed memory kept": (True, "0"),
            "freed memory kept, huge pages (the engine)": (True, "1")}
    for what in [name.strip() for name in args.data.split(",")] + ["demo-eval"]:
        for repeat in range(args.repeats):
            for how, (keep, huge) in ways.items():
                cmd = [sys.executable, __file__, "--allocator-child", f"{what}:{keep}",
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--seed", str(args.seed)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env={**env, "THP_MEM_ALLOC_ENABLE": huge})
                got = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"what": what if what == "demo-eval" else f"{what}, steps 2-{args.steps}",
                             "allocator": how, "repeat": repeat, "seconds": sum(got["seconds"]),
                             "page faults": sum(got["faults"]), "peak GB": got["peak GB"],
                             "after GB": got["after GB"], "on huge pages GB": got["huge pages GB"]})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1,
                                                        float_format=lambda v: f"{v:.4g}"), flush=True)
    return pd.DataFrame(rows)

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="alpaca,sst2", help="comma-separated: alpaca, sst2")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer per data set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--val-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=SEED,
                   help="the trainers' seed (initialisation, dropout, batch order); the rows stay the same")
    p.add_argument("--trainers", default=",".join(TRAINERS),
                   help="comma-separated, run in this order: " + ", ".join(TRAINERS))
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: training, first-step, tokenization, "
                   "evaluation, loss, attention, profile, allocator")
    p.add_argument("--allocator-child", default="", help=argparse.SUPPRESS)  # part 10's fresh processes
    args = p.parse_args()
    if args.allocator_child:
        name, keep = args.allocator_child.split(":")
        warnings.filterwarnings("ignore")
        print(json.dumps(allocator_child(name, keep == "True", args)))
        return 0
    unknown = {t.strip() for t in args.trainers.split(",")} - set(TRAINERS)
    if unknown:
        p.error(f"unknown trainer(s) {', '.join(sorted(unknown))}: choose from {', '.join(TRAINERS)}")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    from nb_finetune import hardware
    print(f"machine: {hardware.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    # Where the hardware has no bf16, torch emulates it at a thirtieth of the speed: that is no
    # peak to measure against (and a 4096-wide emulated matmul takes minutes).
    has_bf16 = hardware.compute_dtype("bfloat16") == "bfloat16"
    peaks = {"bfloat16": matmul_peak(torch.bfloat16) if has_bf16 else float("nan"),
             "float32": matmul_peak(torch.float32)}
    print("1. matmul peak, measured: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items())
          + ("" if has_bf16 else " (no bf16 on this machine)"))
    # Rows of a batch of 8: 8 x 256 (Alpaca's longest batches), 8 x 80 (SST-2's).
    print("   at SmolLM2-135M's own shapes (one layer's base projections, forward and backward):")
    for rows in (2048, 640):
        rates = {name: model_shape_rate(getattr(torch, name), rows) for name in peaks if name == "float32" or has_bf16}
        print(f"   {rows} rows: " + ", ".join(f"{name} {rate / 1e12:.2f} TFLOP/s ({rate / peaks[name]:.0%} of peak)"
                                            for name, rate in rates.items()))
    print()

    # Part 4 runs first, while this process holds little memory: after the training parts it
    # holds several GB, and the demo's first step (3 GB of fresh pages) then waited on the
    # kernel reclaiming memory (14-18 s to step 1 there, against 12-13 s from a fresh start).
    first_steps = [time_to_first_step() for _ in range(2)] if "first-step" not in args.skip else []

    if "training" not in args.skip:
        print(f"2-3. training: {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
              f"LoRA r{LORA['r']} all-linear, lr {LR}, {args.repeats} repeat(s), alternating")
        rows = []
        for name in args.data.split(","):
            rows += compare_training(name.strip(), args, peaks)
        table = pd.DataFrame(rows).groupby(["data", "trainer"]).median(numeric_only=True).drop(columns="repeat")
        print("\nmedians:\n" + table.to_string(float_format=lambda v: f"{v:.4g}"))
        for name in table.index.get_level_values(0).unique():
            if (name, "trl") not in table.index:
                continue
            trl = table.loc[(name, "trl")]
            for who in TRAINERS[:-1]:
                if (name, who) not in table.index:
                    continue
                ours = table.loc[(name, who)]
                print(f"{name}: {who} {ours['tokens/s'] / trl['tokens/s']:.2f}x TRL's tokens/s; "
                      f"validation loss {ours['val loss']:.4f} vs TRL {trl['val loss']:.4f}; "
                      f"wall time {trl['train s'] / ours['train s']:.2f}x shorter for the same rows "
                      f"({ours['steps']:.0f} vs {trl['steps']:.0f} optimizer steps)")

    if "first-step" not in args.skip:
        print("\n4. time to first step, `nb-finetune demo`, warm asset cache:")
        print(first_steps[0].to_string(index=False))
        print("step 1 printed after: " + ", ".join(f"{run['seconds'].iloc[-1]:.2f} s" for run in first_steps))
    if "tokenization" not in args.skip:
        print("\n5. tokenization, Alpaca demo:")
        print(tokenization_speed(args).to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    if "evaluation" not in args.skip:
        print("\n6. evaluation, SmolLM2-135M-Instruct without an adapter, "
              f"{hardware.compute_dtype('auto')} autocast:")
        print(evaluation_speed(args).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if "loss" not in args.skip:
        print(f"\n7. the training loss, one step on the {args.batch_size} longest of 160 Alpaca rows "
              f"(max_length {args.max_length}), best of 3:")
        print(loss_speed(args).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "attention" not in args.skip:
        print(f"\n8. attention, one training step on {args.batch_size} SST-2 rows, best of 3:")
        print(attention_speed(args).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "profile" not in args.skip:
        print(f"\n9. where one training step's time goes ({hardware.compute_dtype('auto')}), torch's profiler:")
        print(step_profile(args).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if "allocator" not in args.skip:
        print(f"\n10. the allocator between steps, {args.steps} training steps x batch {args.batch_size} "
              "(timed from step 2) and the demo's evaluation, in fresh processes, alternating:")
        table = allocator_speed(args)
        print("\nmedians:\n" + table.groupby(["what", "allocator"]).median(numeric_only=True).drop(
            columns="repeat").to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
