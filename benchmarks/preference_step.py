"""A DPO and an ORPO training step against an SFT step on the same rows.

The rows: pairs of real SST-2 sentences (a positive one chosen, a negative one rejected) after
one prompt. The SFT baseline trains on both answers of each pair as completion rows, so a step
sees the same tokens: B pairs = 2B rows (the 2B rows in one forward, as DPO does). DPO adds the
reference pass (the adapter switched off, no gradients); ORPO has none.

Each method trains through the engine (`nb_finetune.run` without evaluation: Session.train) in
a fresh process, alternating, `--repeats` times; a step's time is the median over the steps
after the first two, and the peak is the process's peak resident memory (CUDA memory on a GPU).
Writes benchmarks/results/preference_step-<cpu>-<date>.json. Run from the repository root:

    python benchmarks/preference_step.py                 # SmolLM2-135M-Instruct, 8 steps of 4 pairs
    python benchmarks/preference_step.py --steps 4 --repeats 1
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import machine, short_name  # noqa: E402  (a script beside this one)

SHARED = HERE.parent.parent / "shared" / "data"
PROMPT = "Write one sentence from a positive movie review."


def pairs(n: int, seed: int = 0) -> pd.DataFrame:
    dev = pd.read_csv(SHARED / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    dev = dev[dev.sentence.str.len().between(60, 200)]
    pos = dev[dev.label == "1"].sentence.sample(n, random_state=seed).tolist()
    neg = dev[dev.label == "0"].sentence.sample(n, random_state=seed).tolist()
    return pd.DataFrame({"prompt": [f"{PROMPT} ({i})" for i in range(n)], "chosen": pos, "rejected": neg})


def rows_for(method: str, frame: pd.DataFrame) -> pd.DataFrame:
    """SFT: each pair's two answers as two completion rows, side by side in the data's order."""
    if method != "sft":
        return frame
    both = [(p, a) for p, c, r in zip(frame.prompt, frame.chosen, frame.rejected) for a in (c, r)]
    return pd.DataFrame(both, columns=["prompt", "completion"])


def child(method: str, args) -> dict:
    """One training run in this process; its step times and peak memory."""
    from nb_finetune import RunConfig, memory
    from nb_finetune.pipeline import Session
    frame = rows_for(method, pairs(args.pairs * args.steps))
    per_step = args.pairs * (2 if method == "sft" else 1)
    out = tempfile.mkdtemp(prefix=f"pref-{method}-")
    cfg = RunConfig.from_dict({
        "data": {"task": "completion" if method == "sft" else "preference", "val_fraction": 0.0,
                 "test_fraction": 0.0, "drop_duplicates": False},
        "model": {"name": args.model, "lora_r": 16, "lora_alpha": 32},
        "train": {"output_dir": out, "method": method, "max_steps": args.steps, "batch_size": per_step,
                  "max_length": args.max_length, "logging_steps": 1, "eval_steps": 1000, "warmup_ratio": 0.0,
                  "cache_tokens": False}})
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(frame)
    session.load_model()
    stamps = []

    class Clock:
        def on_train_begin(self, info): stamps.append(time.perf_counter())
        def on_log(self, row, history): stamps.append(time.perf_counter())
        def on_evaluate(self, row, history): pass
        def on_train_end(self, result): pass

    memory.reset_peak()
    session.train([Clock()])
    steps = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    return {"method": method, "step_seconds": statistics.median(steps), "steps_timed": len(steps),
            "peak_bytes": memory.measured_peak(), "rows_per_step": args.pairs * 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (SFT: twice as many rows)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="sft,dpo,orpo")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    described = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    results = []
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                   vars(args).items() if k not in ("child", "out")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1])
    table = pd.DataFrame(results).groupby("method")[["step_seconds", "peak_bytes"]].median()
    sft = table.loc["sft"]
    table["time_vs_sft"] = table["step_seconds"] / sft["step_seconds"]
    table["peak_vs_sft"] = table["peak_bytes"] / sft["peak_bytes"]
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    path = Path(args.out) if args.out else \
        HERE / "results" / f"preference_step-{short_name(described['cpu'])}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"machine": described, "settings": {k: v for k, v in vars(args).items()
                                                                   if k != "child"},
                                "runs": results, "median": table.reset_index().to_dict(orient="records")},
                               indent=2), encoding="utf-8")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
