"""Training speed: nb_finetune with its CPU kernels on and off, beside a plain TRL script.

SmolLM2-135M-Instruct, LoRA r 16 on every linear layer, batch 8, max_length 256, the same
rows, optimizer steps, learning rate and seed for every trainer, on the Alpaca demo and on
SST-2 (both from ../shared/data):
- "auto": nb_finetune's trainer with `train.cpu_kernels: auto` (the kernels on a CPU);
- "off": the same with `train.cpu_kernels: off` (peft's own layers, transformers' own loss);
- "trl": a plain TRL 1.x script: `SFTTrainer` on prompt-completion rows (the chats, or text,
  our formatter renders), completion-only loss, fp32, its defaults otherwise but gradient
  checkpointing off (see `run_trl`), as a hand-written script would train;
- "auto packed" (only when asked for with --trainers): "auto" with `train.packing`, one epoch
  over the same rows, so fewer optimizer steps of fuller rows.
Ours computes in the precision it picks by default (bf16 autocast where the CPU has bf16).

Each run is a fresh process (the allocator's settings and torch's choice of huge pages last
for a process), with huge pages where the command line would use them (train.cpu_kernels not
off); runs alternate (auto, off, trl, auto, ...) so that drift in the machine's speed hits
all of them alike, and the medians of the repeats are reported. Tokens/s counts the
non-padding tokens of the batches each trainer consumed over the wall time of its training.
MFU: (4 N + 6 N_lora + 6 L d s) FLOPs per token (frozen base forward and backward to the
activations, the adapters' own gradients, causal attention over rows of mean length s) times
tokens/s, over this machine's square-matmul peak, measured here. The validation loss is
each trained model's, on the same rows, response tokens only, in fp32, computed alike.

It prints a table and writes the figures, with the machine described, to
benchmarks/results/train_speed-<cpu>-<date>.json. Run from the repository root:
    python benchmarks/train_speed.py                          # tens of minutes on 2 cores
    python benchmarks/train_speed.py --quick                  # a smoke run: 3 steps, 1 repeat, Alpaca
    python benchmarks/train_speed.py --trainers auto,off,trl,"auto packed" --data sst2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LR = 2e-4
TRAINERS = ("auto", "off", "trl", "auto packed")


# -- the machine --------------------------------------------------------------------------------

def cpuinfo() -> dict:
    """The first processor's entry in /proc/cpuinfo (empty where there is none)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def machine() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from nb_finetune import hardware
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name", platform.processor() or platform.machine()),
            "cpu family": info.get("cpu family"), "cpu model": info.get("model"),
            "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "bf16": hardware.bf16_supported(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "python": platform.python_version()}


def short_name(cpu: str) -> str:
    """"AMD EPYC 9R14 96-Core Processor" -> "amd-epyc-9r14"; for the results file's name."""
    cpu = re.sub(r"\((R|TM|tm)\)|\bCPU\b|@.*|\d+-Core Processor|Processor", " ", cpu)
    return "-".join(re.findall(r"[a-z0-9]+", cpu.lower())[:4]) or "unknown-cpu"


def matmul_peak(dtype, seconds: float) -> float:
    """Best FLOP/s of a square matmul over a few sizes, each size twice (a first reading can come
    low: clock ramp, fresh pages; an under-read peak would overstate MFU)."""
    import torch
    best = 0.0
    for n in (1024, 2048, 4096) * 2:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 6:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


# -- data ---------------------------------------------------------------------------------------

def load_rows(name: str, n_train: int, n_val: int, seed: int):
    """Normalised rows (the first n_train to train, the next n_val to validate) and the task."""
    from nb_finetune import config, data
    if name == "alpaca":
        raw = pd.DataFrame(json.loads((SHARED / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
        frame, task = data.normalize(raw, config.DataConfig(task="completion")), "completion"
    else:  # sst2: the sentence and a one-word answer
        raw = pd.read_csv(SHARED / "sst2" / "train.tsv", sep="\t")
        frame = data.normalize(raw, config.DataConfig(task="classification", label_names={"0": "negative",
                                                                                           "1": "positive"}))
        task = "classification"
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return frame.iloc[:n_train], frame.iloc[n_train:n_train + n_val], task


class Counts:
    """Non-padding tokens, padded tokens and original rows of the batches a collator built."""

    def __init__(self):
        self.tokens, self.padded, self.rows = 0, 0, 0

    def add(self, batch) -> None:
        mask = batch["attention_mask"]
        self.tokens += int(mask.sum())
        self.padded += mask.numel()
        # a packed row holds several original rows, each starting at position 0
        self.rows += int(((batch["position_ids"] == 0) & (mask == 1)).sum()) if "position_ids" in batch \
            else mask.shape[0]


class Counting(Counts):
    """Wraps another library's collator (TRL's) and counts its batches."""

    def __init__(self, collator):
        super().__init__()
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        self.add(batch)
        return batch


def counting_collator(pad_id: int, multiple: int):
    """Our collator, counting its batches into `.counts`; the Trainer's copies of it (with the
    padding tally) share those counts."""
    from dataclasses import dataclass, field

    from nb_finetune.data.collator import CompletionOnlyCollator

    @dataclass
    class CountingCollator(CompletionOnlyCollator):
        counts: Counts = field(default_factory=Counts)

        def __call__(self, features):
            batch = super().__call__(features)
            self.counts.add(batch)
            return batch

    return CountingCollator(pad_id, multiple)


# -- one run, in its own process --------------------------------------------------------------

def run_ours(train, fmt, args, out: str, kernels: str, packing: bool):
    from nb_finetune import config, hardware, modeling, training
    from nb_finetune.data.tokens import pack, tokenize_frame
    mcfg = config.ModelConfig(lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    # Packed, the same rows (one epoch) take fewer steps: run the epoch rather than the step count.
    tcfg = config.TrainConfig(output_dir=out, max_steps=0 if packing else args.steps, epochs=1.0, learning_rate=LR,
                              batch_size=args.batch_size, max_length=args.max_length, eval_steps=10**6,
                              save_steps=10**6, logging_steps=max(1, args.steps // 4), warmup_ratio=0.0,
                              seed=args.seed, cpu_kernels=kernels, packing=packing)
    dataset, _ = tokenize_frame(train, fmt)
    if packing:
        dataset = pack(dataset, args.max_length)
    import transformers
    transformers.set_seed(args.seed)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    collator = counting_collator(fmt.tokenizer.pad_token_id, tcfg.pad_to_multiple_of)
    precision = hardware.compute_dtype(mcfg.compute_dtype)

    class Said(training.Callback):
        def on_train_begin(self, info):
            self.kernels = info.get("kernels", "")

    said = Said()
    start = time.perf_counter()
    result = training.train(training.TrainTarget(model, dataset, collator=collator, precision=precision), tcfg,
                            training.Watch(callbacks=[said]))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.global_step, "precision": precision,
            "kernels": said.kernels}, collator.counts, model


def trl_rows(train, fmt) -> list[dict]:
    """The rows as a TRL user writes them: prompt-completion, conversational where our formatter
    uses the chat template (its messages: the same turns ours renders), else plain text with our
    separator at the head of the completion (TRL joins the two as they are and appends the EOS)."""
    rows = []
    for row in train.to_dict(orient="records"):
        if fmt.use_chat:
            user, answer = fmt.messages(row)
            rows.append({"prompt": [user], "completion": [answer]})
        else:
            text, [(start, _)] = fmt.render(row)
            rows.append({"prompt": text[:start], "completion": text[start:]})
    return rows


def run_trl(train, fmt, args, out: str):
    """A plain TRL 1.x script: SFTTrainer on prompt-completion rows. Its completion-only loss
    trains, on the same token sequence, the tokens ours does plus, in chat, the "\\n" the
    template puts after each row's final <|im_end|> (tests/data/test_collator_vs_trl.py,
    difference (a)). A row over max_length (many Alpaca rows at 256) is where the two part
    (difference (b)): TRL keeps its start, so trains less of its response and not its
    <|im_end|>; ours cuts the middle of its prompt first. Either way the row fills max_length,
    so the tokens counted are the same; the validation loss is computed alike for both."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from nb_finetune import modeling
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(modeling.resolve("smollm2-135m-instruct", progress=lambda m: None))
    # TRL's own collator (the one SFTTrainer builds when given none), wrapped to count its batches.
    collator = Counting(DataCollatorForLanguageModeling(pad_token_id=fmt.tokenizer.pad_token_id))
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=LR, max_length=args.max_length, logging_steps=max(1, args.steps // 4),
                    save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
                    disable_tqdm=True, completion_only_loss=True,
                    # fp32: SFTConfig turns bf16 autocast on unless told otherwise (and on a CPU
                    # without bf16 torch then emulates it, many times slower)
                    bf16=False,
                    # off, as in ours on a CPU and in trl 0.19; 1.x's SFTConfig turns it on by default
                    gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(trl_rows(train, fmt)),
                         processing_class=fmt.tokenizer, data_collator=collator,
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": trainer.state.global_step, "precision": "float32",
            "kernels": ""}, collator, trainer.model


def validation_loss(model, features: list[dict], batch_size: int = 8) -> float:
    """Mean cross-entropy over the response tokens of `features`, fp32, the same for every trainer."""
    import torch

    from nb_finetune.data.collator import CompletionOnlyCollator
    from nb_finetune.data.formatter import IGNORE
    model.eval()
    collate = CompletionOnlyCollator(pad_token_id=0, pad_to_multiple_of=None)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(features[i:i + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                             labels.reshape(-1), ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def flops_per_token(model, mean_length: float) -> float:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * (total - lora) + 6 * lora + 6 * cfg.num_hidden_layers * cfg.hidden_size * mean_length


def child(who: str, name: str, args) -> dict:
    """One trainer on one data set, in this (fresh) process."""
    if who != "trl" and not who.startswith("off"):
        # As the command line does with train.cpu_kernels not off, before torch allocates anything.
        from nb_finetune.kernels.allocator import huge_pages_for_tensors
        huge_pages_for_tensors()
    from nb_finetune import config, modeling
    from nb_finetune.data.formatter import Formatter
    train, val, task = load_rows(name, args.steps * args.batch_size, args.val_rows, args.seed)
    tok = modeling.load_tokenizer(config.ModelConfig(), progress=lambda m: None)
    fmt = Formatter.build(tok, task, ["negative", "positive"] if task == "classification" else [], args.max_length)
    with tempfile.TemporaryDirectory() as out:
        if who == "trl":
            figures, counted, model = run_trl(train, fmt, args, out)
        else:
            figures, counted, model = run_ours(train, fmt, args, out, who.split()[0], who.endswith("packed"))
    mean_length = counted.tokens / max(counted.rows, 1)  # causal attention runs within each original row
    return figures | {"tokens": counted.tokens, "padded": counted.padded, "rows": counted.rows,
                      "flops per token": flops_per_token(model, mean_length),
                      "huge pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                      "val loss": validation_loss(model, [fmt.encode(r) for r in val.to_dict(orient="records")])}


# -- the comparison ------------------------------------------------------------------------------

def options(args) -> list[str]:
    return ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--val-rows", str(args.val_rows), "--seed", str(args.seed)]


def compare(args, trainers: list[str], peaks: dict) -> pd.DataFrame:
    rows = []
    for name in args.data.split(","):
        for repeat in range(args.repeats):
            for who in trainers:
                done = subprocess.run([sys.executable, __file__, "--child", f"{who}:{name}", *options(args)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{who} on {name} failed:\n{done.stderr[-4000:]}")
                got = json.loads(done.stdout.strip().splitlines()[-1])
                tps = got["tokens"] / got["seconds"]
                achieved = tps * got["flops per token"]
                rows.append({"data": name, "trainer": who, "repeat": repeat, "precision": got["precision"],
                             "steps": got["steps"], "train s": got["seconds"], "tokens": got["tokens"],
                             "padding share": 1 - got["tokens"] / got["padded"], "tokens/s": tps,
                             "MFU bf16 peak": achieved / peaks["bfloat16"], "MFU fp32 peak": achieved / peaks["float32"],
                             "val loss": got["val loss"], "huge pages": got["huge pages"], "kernels": got["kernels"]})
                shown = {k: v for k, v in rows[-1].items() if k != "kernels"}
                print(pd.DataFrame([shown]).to_string(index=False, header=len(rows) == 1, col_space=12,
                                                      float_format=lambda v: f"{v:.4g}"), flush=True)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> list[str]:
    """Each trainer's tokens/s and validation loss against TRL's and "off"'s, per data set."""
    lines = []
    for name in table.index.get_level_values(0).unique():
        for who, against in (("auto", "off"), ("auto", "trl"), ("off", "trl"), ("auto packed", "trl")):
            if (name, who) in table.index and (name, against) in table.index:
                a, b = table.loc[(name, who)], table.loc[(name, against)]
                lines.append(f"{name}: {who} {a['tokens/s'] / b['tokens/s']:.2f}x {against}'s tokens/s; "
                             f"validation loss {a['val loss']:.4f} vs {b['val loss']:.4f}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="alpaca,sst2", help="comma-separated: alpaca, sst2")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer per data set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--val-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=42, help="initialisation, dropout, batch order, and the rows drawn")
    p.add_argument("--trainers", default="auto,off,trl", help="comma-separated, in this order: " + ", ".join(TRAINERS))
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, 1 repeat, Alpaca, 8 validation rows")
    p.add_argument("--note", default="", help="a note stored with the results")
    p.add_argument("--out", default="", help="results file (default benchmarks/results/train_speed-<cpu>-<date>.json)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one run, in a fresh process
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        import transformers
        transformers.logging.set_verbosity_error()
        who, name = args.child.split(":")
        print(json.dumps(child(who, name, args)))
        return 0
    if args.quick:
        args.steps, args.repeats, args.data, args.val_rows = 3, 1, "alpaca", 8
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        p.error(f"unknown trainer(s) {', '.join(sorted(unknown))}: choose from {', '.join(TRAINERS)}")
    import torch
    described = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()) + "\n")
    # Where the CPU has no bf16 torch emulates it, many times slower: no peak to measure against.
    seconds = 1.0 if args.quick else 6.0
    peaks = {"bfloat16": matmul_peak(torch.bfloat16, seconds) if described["bf16"] else float("nan"),
             "float32": matmul_peak(torch.float32, seconds)}
    print("matmul peak, measured: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    print(f"\ntraining: {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, LoRA r{LORA['r']} "
          f"all-linear, lr {LR}, {args.repeats} repeat(s), alternating, each run in a fresh process")
    rows = compare(args, trainers, peaks)
    table = rows.groupby(["data", "trainer"], sort=False).median(numeric_only=True).drop(columns=["repeat", "huge pages"])
    print("\nmedians:\n" + table.to_string(float_format=lambda v: f"{v:.4g}"))
    lines = summary(table)
    print("\n" + "\n".join(lines))
    for (name, who), kernels in rows.groupby(["data", "trainer"], sort=False)["kernels"].first().items():
        if kernels:
            print(f"{name}, {who}: {kernels}")
    note = args.note or ("smoke run (--quick): too few steps for figures to quote" if args.quick else "")
    path = Path(args.out) if args.out else \
        HERE / "results" / f"train_speed-{short_name(described['cpu'])}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "train_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"), "note": note,
        "machine": described, "matmul peak FLOP/s": peaks,
        "settings": {"data": args.data, "steps": args.steps, "repeats": args.repeats, "batch size": args.batch_size,
                     "max length": args.max_length, "validation rows": args.val_rows, "seed": args.seed,
                     "lora": LORA, "learning rate": LR, "trainers": trainers},
        "runs": rows.to_dict(orient="records"), "medians": table.reset_index().to_dict(orient="records"),
        "summary": lines}, indent=1, default=str) + "\n")
    print(f"\nwritten: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
