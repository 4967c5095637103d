"""The live training curves of one run in two row orders: transformers' `group_by_length` (each
megabatch from its longest rows to its shortest) and nb_finetune's (the same length groups,
the steps shuffled; training.sampler).

SmolLM2-135M-Instruct on the Alpaca demo rows (from ../shared/data), batch 8, max_length 256.
By default a replay: the model is frozen, each step's rows go through it once, and both orders
are read from the same measured steps (loss per trained token, non-padding tokens, seconds), as
the trainer logs them: before, the mean loss of each log's steps and the tokens/s of those steps
alone; now, the same loss and tokens/s over the last training.trainer.RATE_WINDOW_STEPS steps. With a
model that does not learn, whatever moves in a curve is the order of the rows. `--train` trains
instead (LoRA r 16, the same seed, learning rate and steps for both orders; much slower).

It draws both orders' logged loss and tokens/s side by side into docs/images/live_curves.png,
reads each history with the diagnosis, and writes the figures, the padding share of each
order over the epoch, and the machine to benchmarks/results/live_curves-<cpu>-<date>.json.
Run from the repository root:
    python benchmarks/live_curves.py                       # the replay of one epoch
    python benchmarks/live_curves.py --train --steps 60    # two training runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import LORA, LR, load_rows, machine, short_name  # noqa: E402

ORDERS = {"megabatch": "transformers' group_by_length (before)", "shuffled": "steps shuffled (now)"}


def run(order: str, train: pd.DataFrame, fmt, args) -> dict:
    """One training run in `order`: its history, padding shares and wall time."""
    import transformers

    from nb_finetune import config, hardware, modeling, training
    from nb_finetune.data.collator import CompletionOnlyCollator
    from nb_finetune.data.tokens import tokenize_frame
    from nb_finetune.training.trainer import SafeTrainer
    SafeTrainer.shuffle_length_groups = order == "shuffled"
    mcfg = config.ModelConfig(lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    dataset, _ = tokenize_frame(train, fmt)
    transformers.set_seed(args.seed)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    with tempfile.TemporaryDirectory() as out:
        tcfg = config.TrainConfig(output_dir=out, max_steps=args.steps, learning_rate=LR, batch_size=args.batch_size,
                                  max_length=args.max_length, eval_steps=10**6, save_steps=10**6,
                                  logging_steps=args.logging_steps, warmup_ratio=0.0, seed=args.seed)
        collator = CompletionOnlyCollator(fmt.tokenizer.pad_token_id, tcfg.pad_to_multiple_of)
        start = time.perf_counter()
        result = training.train(training.TrainTarget(model, dataset, collator=collator,
                                                       precision=hardware.compute_dtype("auto")), tcfg)
    return {"history": result.history, "seconds": time.perf_counter() - start,
            "padding_share": result.padding.shares()["batches_padded"]}


def replay(train: pd.DataFrame, fmt, args) -> dict:
    """Both orders of one epoch read from the same frozen forward passes, one per step."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from nb_finetune import config, hardware, modeling
    from nb_finetune.data.collator import CompletionOnlyCollator
    from nb_finetune.data.tokens import tokenize_frame
    from nb_finetune.training.sampler import shuffled_length_groups
    from nb_finetune.training.trainer import RATE_WINDOW_STEPS
    dataset, _ = tokenize_frame(train, fmt)
    lengths = [len(row["input_ids"]) for row in dataset]
    orders = {"megabatch": get_length_grouped_indices(lengths, args.batch_size, generator=seeded(args.seed)),
              "shuffled": shuffled_length_groups(lengths, args.batch_size, seeded(args.seed))}
    model = modeling.load_base(config.ModelConfig(), "completion", progress=lambda m: None).eval()
    precision = hardware.compute_dtype("auto")  # as training computes: bf16 where the CPU has it
    collator = CompletionOnlyCollator(fmt.tokenizer.pad_token_id, 8)
    measured = {}
    for rows in chunks(orders["megabatch"], args.batch_size):
        batch = collator([dataset[i] for i in rows])
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = float(model(**batch).loss)
        measured[tuple(sorted(rows))] = (loss, int(batch["attention_mask"].sum()), time.perf_counter() - start)
    runs = {}
    for order, indices in orders.items():
        steps = pd.DataFrame([measured[tuple(sorted(rows))] for rows in chunks(indices, args.batch_size)],
                             columns=["loss", "tokens", "seconds"])
        window = args.logging_steps if order == "megabatch" else RATE_WINDOW_STEPS
        runs[order] = {"history": logged(steps, args.logging_steps, window), "seconds": float(steps["seconds"].sum()),
                       "padding_share": step_order_padding(lengths, indices, args.batch_size)}
    return runs


def seeded(seed: int):
    import torch
    return torch.Generator().manual_seed(seed)


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def logged(steps: pd.DataFrame, every: int, rate_window: int) -> pd.DataFrame:
    """The history the trainer would log: every `every` steps, the mean loss of those steps and
    the tokens/s of the last `rate_window` steps (tokens over seconds)."""
    rows = []
    for end in range(every, len(steps) + 1, every):
        recent = steps.iloc[max(0, end - rate_window):end]
        rows.append({"step": end, "train_loss": steps["loss"].iloc[end - every:end].mean(),
                     "tokens_per_second": recent["tokens"].sum() / recent["seconds"].sum()})
    return pd.DataFrame(rows)


def step_order_padding(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The padding share of an epoch in this order, each batch padded to its longest row."""
    from nb_finetune.training.sampler import step_order_shares
    return step_order_shares(lengths, order, batch_size)["padding_share"]


def figure(runs: dict):
    """Loss (left) and tokens/s (right) against step, both orders on the same axes."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    loss_ax, rate_ax = fig.subplots(1, 2)
    for (order, r), color in zip(runs.items(), ("#7f7f7f", "#1f77b4")):
        h = r["history"].dropna(subset=["train_loss"])
        label = f"{ORDERS[order]}, padding {r['padding_share']:.1%}"
        loss_ax.plot(h["step"], h["train_loss"], "o-", ms=3, color=color, label=label)
        rate_ax.plot(h["step"], h["tokens_per_second"], "o-", ms=3, color=color, label=ORDERS[order])
    loss_ax.set(xlabel="step", ylabel="logged training loss", title="training loss, the same rows")
    rate_ax.set(xlabel="step", ylabel="tokens/s", title="tokens/s as logged", ylim=(0, None))
    for ax in (loss_ax, rate_ax):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="train in both orders instead of the frozen replay")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per training run (with --train)")
    p.add_argument("--rows", type=int, default=480,
                   help="Alpaca demo rows (transformers' megabatch: rows / 32 steps at batch 8, at most 50)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--logging-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--image", default=str(HERE.parent / "docs" / "images" / "live_curves.png"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    from nb_finetune import config, modeling
    from nb_finetune.data.formatter import Formatter
    from nb_finetune.render.figures import to_png
    train, _, _ = load_rows("alpaca", args.rows, 0, args.seed)
    fmt = Formatter.build(modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None), "completion", [],
                          args.max_length)
    if args.train:
        runs = {order: run(order, train, fmt, args) for order in ORDERS}
    else:
        runs = replay(train, fmt, args)
    from nb_finetune import training
    for r in runs.values():
        r["diagnosis"] = training.diagnose(r["history"].assign(val_loss=float("nan")))
    Path(args.image).write_bytes(to_png(figure(runs), dpi=100))
    results = {order: {"padding_share": r["padding_share"], "seconds": r["seconds"], "diagnosis": r["diagnosis"],
                       "history": r["history"][["step", "train_loss", "tokens_per_second"]].to_dict(orient="list")}
               for order, r in runs.items()}
    for order, r in results.items():
        print(f"{ORDERS[order]}: padding {r['padding_share']:.2%}, {r['seconds']:.0f} s; {r['diagnosis']}")
        print("  loss " + " ".join(f"{v:.2f}" for v in r["history"]["train_loss"]))
        print("  tok/s " + " ".join(f"{v:.0f}" for v in r["history"]["tokens_per_second"]))
    described = machine()
    out = HERE / "results" / f"live_curves-{short_name(described['cpu'])}-{datetime.date.today()}.json"
    out.write_text(json.dumps({"machine": described, "args": vars(args), "runs": results}, indent=1, default=str))
    print(f"\nwrote {args.image} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
