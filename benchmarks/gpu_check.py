"""GPU check: LoRA vs 4-bit QLoRA on SmolLM2-135M-Instruct for a fixed number of steps.

Prints, for each, tokens/s of training, peak memory and the final validation loss, side by
side. On a machine without CUDA it runs the same on the CPU (peak RSS instead of CUDA memory),
so the script itself is checked everywhere:

    python benchmarks/gpu_check.py --steps 30
"""
from __future__ import annotations

import argparse
import sys
import time

import pandas as pd


def one_run(quantization: str, steps: int, output: str) -> dict:
    # As `nb-finetune run` does, before torch is imported: it reads the setting once.
    from nb_finetune.kernels.allocator import huge_pages_for_tensors
    huge_pages_for_tensors()
    from nb_finetune import hardware, load_preset, memory
    from nb_finetune.evaluation.scoring import completion_loss
    from nb_finetune.pipeline import Session

    gpu = hardware.cuda_available()
    # The CPU path only proves the script runs: a small slice, short rows.
    cfg = load_preset("qlora-gpu").with_overrides({
        "model.quantization": quantization, "data.max_rows": 1200 if gpu else 200, "train.max_steps": steps,
        "train.eval_steps": steps, "train.logging_steps": max(1, steps // 5), "train.max_length": 256 if gpu else 96,
        "train.batch_size": 16 if gpu else 4, "train.grad_accum": 1, "train.output_dir": f"{output}/{quantization}"})
    session = Session(cfg, progress=lambda m: None)
    session.load_model()
    # The validation loss of the untrained model: 4-bit rounding alone moves the base's
    # predictions, so a difference after a few steps may be there before any training.
    before, _ = completion_loss(session.model, session.datasets["validation"], session.collator,
                                cfg.train.batch_size, session.precision)
    memory.reset_peak()  # the peak of training alone, as the estimate counts it
    estimate = session.memory_estimate.total / 2**20
    start = time.perf_counter()
    result = session.train()
    seconds = time.perf_counter() - start
    h = result.history
    peak = session.peak_memory / 2**20
    return {"run": "QLoRA 4-bit" if quantization == "4bit" else "LoRA", "device": hardware.describe().get("gpu", "cpu"),
            "steps": result.global_step, "train seconds": round(seconds, 1),
            "tokens/s": round(h["tokens_per_second"].dropna().median(), 0),
            "estimated MiB": round(estimate), "peak MiB": round(peak), "val loss before": round(before, 4),
            "final val loss": round(h["val_loss"].dropna().iloc[-1], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--output", default="runs/gpu-check")
    args = p.parse_args()
    # Run each in a fresh process so peak memory is its own.
    import json
    import subprocess
    rows = []
    for quant in ("none", "4bit"):
        code = (f"import json,sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import gpu_check as g; "
                f"print('RESULT' + json.dumps(g.one_run({quant!r}, {args.steps}, {args.output!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[len("RESULT"):]))
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
