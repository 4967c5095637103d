"""Gemma 3 270M training on a CPU: tokens/s and peak memory with `train.cpu_kernels` auto
against off, in one run.

The built-in Gemma 3 270M base (vocabulary 262,144: a batch of 8 x 512 tokens has 4.3 GB of
fp32 logits where the fused loss keeps none), LoRA r 16 on every linear layer, the Alpaca demo
(from ../shared/data; 200 rows by default), batch 8, max_length 512, the same rows, steps,
learning rate and seed for both. Each run is a fresh process (peak resident memory is per
process), "auto" with huge pages as the command line sets them; runs alternate (auto, off,
auto, ...) and the medians are reported. Tokens/s counts the non-padding tokens of the
batches over the wall time of training; the peak is the process's resident high-water mark
from just before training to its end (the model already loaded); the held-out loss is each
trained model's on the same validation rows, response tokens only, in fp32, computed alike
one row at a time after the peak is read.

Writes benchmarks/results/gemma_speed-<cpu>-<date>.json with the machine described. Run from
the repository root:
    python benchmarks/gemma_speed.py                       # 25 steps each; long on 2 cores
    python benchmarks/gemma_speed.py --rows 24 --repeats 1 --note "shared machine"
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import counting_collator, load_rows, machine, short_name, validation_loss  # noqa: E402

MODEL = "gemma3-270m"
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
LR = 2e-4


def child(kernels: str, args) -> dict:
    """One training run in this (fresh) process."""
    if kernels == "auto":  # as the command line does, before torch allocates anything
        from nb_finetune.kernels.allocator import huge_pages_for_tensors
        huge_pages_for_tensors()
    import transformers

    from nb_finetune import config, hardware, memory, modeling, training
    from nb_finetune.data.formatter import Formatter
    from nb_finetune.data.tokens import tokenize_frame
    train, val, _ = load_rows("alpaca", args.rows, args.val_rows, args.seed)
    mcfg = config.ModelConfig(name=MODEL, **LORA)
    fmt = Formatter.build(modeling.load_tokenizer(mcfg, progress=lambda m: None), "completion", [], args.max_length)
    dataset, _ = tokenize_frame(train, fmt)
    with tempfile.TemporaryDirectory() as out:
        tcfg = config.TrainConfig(output_dir=out, epochs=1.0, learning_rate=LR, batch_size=args.batch_size,
                                  max_length=args.max_length, eval_steps=10**6, save_steps=10**6, logging_steps=5,
                                  warmup_ratio=0.0, seed=args.seed, cpu_kernels=kernels)
        transformers.set_seed(args.seed)
        model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
        collator = counting_collator(fmt.tokenizer.pad_token_id, tcfg.pad_to_multiple_of)
        precision = hardware.compute_dtype(mcfg.compute_dtype)
        memory.reset_peak()
        start = time.perf_counter()
        result = training.train(training.TrainTarget(model, dataset, collator=collator, precision=precision), tcfg)
        seconds, peak = time.perf_counter() - start, memory.measured_peak()
    held_out = validation_loss(model, [fmt.encode(r) for r in val.to_dict(orient="records")], batch_size=1)
    return {"seconds": seconds, "steps": result.global_step, "precision": precision, "tokens": collator.counts.tokens,
            "padded": collator.counts.padded, "peak bytes": peak, "val loss": held_out,
            "huge pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}


def options(args) -> list[str]:
    return ["--rows", str(args.rows), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--val-rows", str(args.val_rows), "--seed", str(args.seed)]


def compare(args) -> pd.DataFrame:
    rows = []
    for repeat in range(args.repeats):
        for kernels in ("auto", "off"):
            done = subprocess.run([sys.executable, __file__, "--child", kernels, *options(args)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{kernels} failed:\n{done.stderr[-4000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"kernels": kernels, "repeat": repeat, "precision": got["precision"], "steps": got["steps"],
                         "train s": got["seconds"], "tokens": got["tokens"], "tokens/s": got["tokens"] / got["seconds"],
                         "peak GiB": got["peak bytes"] / 2**30, "val loss": got["val loss"],
                         "huge pages": got["huge pages"]})
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1, col_space=10,
                                                    float_format=lambda v: f"{v:.4g}"), flush=True)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> list[str]:
    auto, off = table.loc["auto"], table.loc["off"]
    return [f"auto {auto['tokens/s'] / off['tokens/s']:.2f}x off's tokens/s (target: at least 1.5x)",
            f"auto's peak {auto['peak GiB'] / off['peak GiB']:.0%} of off's (target: at most 60%)",
            f"held-out loss {auto['val loss']:.4f} (auto) vs {off['val loss']:.4f} (off)"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200, help="Alpaca demo rows trained on, one epoch")
    p.add_argument("--repeats", type=int, default=1, help="runs of each setting")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--val-rows", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--note", default="", help="a note stored with the results (say when the machine was shared)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one run, in a fresh process
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        import transformers
        transformers.logging.set_verbosity_error()
        print(json.dumps(child(args.child, args)))
        return 0
    described = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    print(f"\n{MODEL}: {args.rows} Alpaca rows, batch {args.batch_size}, max_length {args.max_length}, LoRA r16 "
          f"all-linear, lr {LR}, {args.repeats} repeat(s), alternating, each run in a fresh process")
    rows = compare(args)
    table = rows.groupby("kernels", sort=False).median(numeric_only=True).drop(columns=["repeat", "huge pages"])
    print("\nmedians:\n" + table.to_string(float_format=lambda v: f"{v:.4g}"))
    lines = summary(table)
    print("\n" + "\n".join(lines))
    path = HERE / "results" / f"gemma_speed-{short_name(described['cpu'])}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "gemma_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"), "note": args.note,
        "machine": described, "settings": {"model": MODEL, "rows": args.rows, "repeats": args.repeats,
                                           "batch size": args.batch_size, "max length": args.max_length,
                                           "validation rows": args.val_rows, "seed": args.seed, "lora": LORA,
                                           "learning rate": LR},
        "runs": rows.to_dict(orient="records"), "medians": table.reset_index().to_dict(orient="records"),
        "summary": lines}, indent=1, default=str) + "\n")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
