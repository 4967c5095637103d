"""SST-2 sentiment: base vs LoRA-tuned test accuracy, and the time it took, for both built-in models.

What it measures, per model:
- smollm2-135m-instruct, objective "completion": it learns to write "positive"/"negative".
  Base = the same model with its adapter switched off (zero-shot, label picked by likelihood).
- minilm-l6, objective "head": a classification head + LoRA. A fresh head has no zero-shot
  base, so its only baseline is the majority class.
Each trains on N rows sampled (seeded) from SST-2 train.tsv (10% of them held out for
validation during training) and is tested on the whole GLUE validation.tsv (872 rows).
Reported: base / tuned / majority accuracy, tuned macro-F1, training and evaluation wall
seconds, and training throughput (non-padding tokens of all epochs / training seconds,
the periodic validation passes included).

Run from the repository root (the default takes about 15-25 minutes on a 2-core CPU):
    python benchmarks/sst2_base_vs_tuned.py
    python benchmarks/sst2_base_vs_tuned.py --train-rows 200 --max-test-rows 100   # a quick try
The table is printed at the end and written to <output>/results.csv; each model's run
(adapter, history, test metrics, report.json) is kept in <output>/<model>/.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import time
from pathlib import Path

import pandas as pd

from nb_finetune.config import RunConfig
from nb_finetune.kernels.allocator import huge_pages_for_tensors

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
SEED = 42

# Settings per model, sized for a 2-core CPU. The head starts from random weights, so
# MiniLM gets more epochs and a higher learning rate than the decoder, which only has to
# learn to say a word it already knows.
MODELS = {
    "smollm2-135m-instruct": {"model": {"objective": "completion"},
                              "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-4}},
    "minilm-l6": {"model": {"objective": "head"},
                  "train": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3}},
}


def read_tsv(path: Path) -> pd.DataFrame:
    # GLUE TSVs carry bare quotes inside sentences: no quoting, or rows would merge.
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)


def config_for(name: str, test_path: Path, train_rows: int, args) -> RunConfig:
    spec = MODELS[name]
    t = spec["train"]
    steps = math.ceil(train_rows * 0.9 / t["batch_size"]) * t["epochs"]
    return RunConfig.from_dict({
        # The rows come in as a DataFrame (Session.prepare_data(source)); source is only the record.
        "data": {"source": f"{args.data / 'train.tsv'} (sample of {train_rows}, seed {SEED})",
                 "task": "classification", "text_column": "sentence",
                 "label_names": {"0": "negative", "1": "positive"}, "val_fraction": 0.1,
                 # The test split is exactly validation.tsv (read as TSV by its suffix).
                 "test_source": str(test_path), "seed": SEED},
        "model": {"name": name, **spec["model"]},
        "train": {**t, "max_length": 128, "output_dir": str(Path(args.output) / name), "seed": SEED,
                  # About 4 validations and 20 loss lines per run, whatever its length.
                  "eval_steps": max(1, steps // 4), "logging_steps": max(1, steps // 20)},
        # No generated samples: they cost time and measure nothing here.
        "eval": {"max_test_rows": args.max_test_rows, "num_samples": 0},
    })


def run_one(name: str, train: pd.DataFrame, test_path: Path, args) -> dict:
    from nb_finetune.pipeline import Session
    from nb_finetune.training import ConsoleProgress
    print(f"\n=== {name} ===", flush=True)
    cfg = config_for(name, test_path, len(train), args)
    session = Session(cfg, progress=lambda m: print(m, flush=True))
    session.prepare_data(train)
    print("data report:\n" + session.prep.report.summary(), flush=True)
    session.tokenize()
    session.load_model()
    result = session.train([ConsoleProgress(lambda m: print(m, flush=True))])
    start = time.perf_counter()
    ev = session.evaluate()
    eval_seconds = time.perf_counter() - start
    session.write_outputs()
    print(ev.summary(), flush=True)

    m = ev.metrics
    majority = m.loc[next(i for i in m.index if str(i).startswith("majority"))]
    # Throughput over what the Trainer counts (non-padding tokens), every epoch.
    tokens = session.token_stats["train"].tokens * cfg.train.epochs
    return {
        "model": name,
        "objective": session.objective,
        "train rows": len(session.datasets["train"]),
        "test rows": len(ev.predictions),
        "base acc": f"{m.loc['base', 'accuracy']:.3f}" if "base" in m.index else "n/a",
        "tuned acc": f"{m.loc['tuned', 'accuracy']:.3f}",
        "majority acc": f"{majority['accuracy']:.3f}",
        "macro-F1 tuned": f"{m.loc['tuned', 'macro_f1']:.3f}",
        "train s": round(result.seconds, 1),
        "eval s": round(eval_seconds, 1),
        "train tok/s": round(tokens / result.seconds),
        "precision": session.precision,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.tsv and validation.tsv")
    p.add_argument("--train-rows", type=int, default=2000, help="rows sampled from train.tsv (10%% validate)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--output", default="runs/bench-sst2", help="folder for runs and results.csv")
    p.add_argument("--max-test-rows", type=int, default=0, help="test on at most this many rows (0: all)")
    args = p.parse_args()

    # As `nb-finetune run` does, before torch is imported (it reads the setting once, at its
    # first allocation), so that these figures compare with the command line's.
    huge_pages_for_tensors()
    import torch
    import transformers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read when a process forks, not on import
    transformers.logging.set_verbosity_error()
    # Timings only compare on an otherwise idle machine: record how busy it was.
    load_before, wall_start, cpu_start = os.getloadavg()[0], time.perf_counter(), os.times()
    full = read_tsv(args.data / "train.tsv")
    train = full.sample(n=min(args.train_rows, len(full)), random_state=SEED).reset_index(drop=True)
    rows = [run_one(name, train, args.data / "validation.tsv", args) for name in args.models]

    cpu = os.times()
    cores_used = (cpu.user + cpu.system - cpu_start.user - cpu_start.system) / (time.perf_counter() - wall_start)
    table = pd.DataFrame(rows)
    precisions = set(table.pop("precision"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    print(f"\nSST-2, {len(train):,} rows sampled from train.tsv (seed {SEED}), tested on validation.tsv")
    print(table.to_string(index=False))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, bf16 used: "
          f"{'yes' if precisions == {'bfloat16'} else ', '.join(sorted(precisions))}; "
          f"load average {load_before:.1f} at start; this run got {cores_used:.2f} cores on average")
    print(f"written: {out / 'results.csv'}")


if __name__ == "__main__":
    main()
