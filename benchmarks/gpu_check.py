"""GPU check at Colab T4 scale: nb_finetune against a plain TRL 1.x SFTTrainer script.

Both train the same tokenized rows with the same LoRA/QLoRA settings, each run in a fresh
process (so each peak is its own), side by side in one run:

- "t4": fp16 forced and the process capped at 15 GiB (torch.cuda.set_per_process_memory_fraction),
  standing in for a T4 on whatever GPU is lent; "native": the GPU's own bf16 (fp16 without it).
- quality: SmolLM2-135M-Instruct, QLoRA 4-bit, on BoolQ: validation loss, ours as configured
  by default and ours with Liger Kernel forced on (train.liger_kernel: on), the measurement that
  decides whether 'auto' may turn it on for llama (training.policy.LIGER_MEASURED).
- scale: a 1.7B llama built from SmolLM2-1.7B's config with random weights (speed and memory do
  not depend on the weights), QLoRA 4-bit, rows of exactly --seq tokens: tokens/s and the peak
  torch.cuda.max_memory_allocated.
- longest: the longest row (doubling from --seq) that trains two steps at batch 1 under the cap.
- preference: DPO and ORPO, QLoRA 4-bit, on the debias-dpo preset's StereoSet pairs (built in):
  seconds, peak, and the last reward margin and validation reward accuracy, so that preference
  tuning is seen training on a GPU (its speed against SFT is benchmarks/preference_step.py's).

Figures go to benchmarks/results/gpu_check-<gpu>-<date>.json with the GPU named. Without CUDA
the same runs happen small on the CPU (fp32, no quantization, a random 2-layer llama for both
models, short rows), which checks the script itself; their figures are written under --output only.

    python benchmarks/gpu_check.py                      # on a GPU: every run
    python benchmarks/gpu_check.py --only scale --steps 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
CAP_GIB = 15  # a T4's memory
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LR, SEED = 2e-4, 42
# SmolLM2-1.7B's config (llama); context raised so the longest-row search is not stopped by it.
SCALE_CONFIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=130000.0,
                    max_position_embeddings=32768, tie_word_embeddings=True)
TINY_CONFIG = dict(SCALE_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)


def gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def cap_memory(spec: dict) -> None:
    """The T4 stand-in: this process may allocate at most CAP_GIB, before anything is allocated."""
    import torch
    if spec["precision"] == "t4" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / total))


def dtype_for(spec: dict) -> str:
    from nb_finetune import hardware
    if not gpu():
        return "float32"
    return "float16" if spec["precision"] == "t4" else hardware.compute_dtype("auto")


def build_scale_model(folder: Path) -> Path:
    """The random-weight llama, saved once (fp16) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nb_finetune import assets
    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(assets.model_path("smollm2-135m-instruct"))
    torch.manual_seed(SEED)
    cfg = LlamaConfig(**(SCALE_CONFIG if gpu() else TINY_CONFIG), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float16 if gpu() else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_config(spec: dict):
    """The nb_finetune config of a run; the TRL script takes its settings and rows from it too."""
    from nb_finetune import load_preset
    small = not gpu()
    over = {"model.quantization": "none" if small else "4bit", "model.compute_dtype": dtype_for(spec),
            "model.lora_r": LORA["r"], "model.lora_alpha": LORA["lora_alpha"],
            "model.lora_dropout": LORA["lora_dropout"], "train.max_steps": spec["steps"],
            "train.learning_rate": LR, "train.seed": SEED, "train.eval_steps": 10**6, "train.save_steps": 10**6,
            "train.logging_steps": 1, "train.warmup_ratio": 0.0, "train.output_dir": spec["output"],
            "train.batch_size": spec["batch"], "train.grad_accum": spec["accum"], "train.max_length": spec["seq"],
            "train.liger_kernel": "on" if spec["trainer"] == "ours + Liger" else "auto"}
    if spec["model"] == "preference":
        method = spec["trainer"].split()[-1]
        over |= {"train.method": method, "data.max_rows": 200 if not small else 40, "probe.probes": [],
                 "eval.general_source": ""} | ({} if not small else {"model.name": spec["model_dir"]})
        return load_preset("debias-dpo").with_overrides(over)
    if spec["model"] == "quality":
        # Small: the script's own check only, so the random 2-layer llama stands in here too.
        over |= {"data.max_rows": 1200} if not small else {"data.max_rows": 120, "model.name": spec["model_dir"]}
    else:
        over |= {"model.name": spec["model_dir"], "data.source": "", "data.task": "completion",
                 "data.val_fraction": 0.05, "data.test_fraction": 0.05}
    return load_preset("qlora-gpu").with_overrides(over)


def scale_rows(seq: int, rows: int) -> pd.DataFrame:
    """Rows longer than `seq` tokens, so that each is cut to exactly `seq` (the prompt's middle
    goes, the completion stays): every row trains the same number of tokens."""
    import random
    rng = random.Random(SEED)
    words = [f"w{i}" for i in range(2000)]
    return pd.DataFrame({"prompt": [" ".join(rng.choices(words, k=seq)) for _ in range(rows)],
                         "completion": [" ".join(rng.choices(words, k=seq // 4)) for _ in range(rows)]})


def session_for(spec: dict):
    """nb_finetune's session with its rows tokenized (nothing loaded yet)."""
    from nb_finetune.pipeline import Session
    s = Session(run_config(spec), progress=lambda m: None)
    s.prepare_data(scale_rows(spec["seq"], spec["steps"] * spec["batch"] * spec["accum"] + 40)
                   if spec["model"] == "scale" else None)
    s.tokenize()
    return s


def run_ours(spec: dict, s) -> tuple[float, object]:
    from nb_finetune import memory
    s.load_model()
    memory.reset_peak()  # the peak of training alone, as for TRL
    start = time.perf_counter()
    s.train()
    return time.perf_counter() - start, s.model


def run_trl(spec: dict, s) -> tuple[float, object]:
    """The plain script: from_pretrained (4-bit through BitsAndBytesConfig where ours quantizes),
    SFTTrainer with a LoraConfig and SFTConfig's defaults otherwise (gradient checkpointing aside),
    on the same tokenized rows (completion_mask marks the trained tokens, as ours label them)."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from nb_finetune import memory, modeling
    cfg, dtype = s.cfg, getattr(torch, dtype_for(spec))
    rows = [s.datasets["train"][i] for i in range(len(s.datasets["train"]))]
    data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
                              for r in rows])
    quant = None if cfg.model.quantization == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    transformers.set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(modeling.resolve(cfg.model.name, progress=lambda m: None),
                                                 quantization_config=quant, dtype=dtype)
    args = SFTConfig(output_dir=spec["output"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     gradient_accumulation_steps=spec["accum"], learning_rate=LR, max_length=spec["seq"],
                     logging_steps=1, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
                     warmup_steps=0, use_cpu=not gpu(), completion_only_loss=True,
                     # off, as trl 0.19's default was: 1.x's SFTConfig turns it on by default
                     gradient_checkpointing=False,
                     fp16=dtype == torch.float16 and gpu(), bf16=dtype == torch.bfloat16 and gpu())
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=s.tokenizer,
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))
    memory.reset_peak()
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, trainer.model


def child(spec: dict) -> dict:
    """One run, in this (fresh) process."""
    cap_memory(spec)
    from nb_finetune import memory
    from nb_finetune.evaluation.scoring import completion_loss
    s = session_for(spec)
    try:
        seconds, model = (run_trl if spec["trainer"] == "trl" else run_ours)(spec, s)
    except Exception as err:  # running out of memory is a result here, not a failure of the script
        if "out of memory" not in str(err).lower() and "OutOfMemory" not in type(err).__name__:
            raise
        return {"fits": False}
    peak = memory.measured_peak()
    tokens = spec["steps"] * spec["batch"] * spec["accum"] * spec["seq"]  # every scale row is `seq` long
    out = {"fits": True, "seconds": round(seconds, 2), "peak MiB": round(peak / 2**20),
           "tokens/s": round(tokens / seconds) if spec["model"] == "scale" else None}
    if spec["trainer"] != "trl":
        from nb_finetune.training.policy import use_liger
        out["liger"] = use_liger(s.cfg.train, "llama")[0]  # both models are llamas
        out["padding share"] = {k: round(v, 4) for k, v in s.train_result.padding.shares().items()}
    if spec["model"] == "quality":
        loss, _ = completion_loss(model, s.datasets["validation"], s.collator, 8, dtype_for(spec))
        out["val loss"] = round(loss, 4)
    if spec["model"] == "preference":
        history = s.train_result.history
        for name in ("reward_margin", "val_reward_accuracy"):
            values = history[name].dropna() if name in history else []
            out[name.replace("_", " ")] = round(float(values.iloc[-1]), 4) if len(values) else None
    return out


def in_fresh_process(spec: dict) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import gpu_check as g; "
            f"print('RESULT' + json.dumps(g.child({spec!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"{spec['trainer']} {spec['model']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def plan(args, model_dir: str) -> list[dict]:
    """Every (precision, model, trainer) run, trainers side by side."""
    small = not gpu()
    precisions = ["t4", "native"] if not small else ["native"]
    models = {"quality": dict(seq=256 if not small else 64, batch=16 if not small else 4, accum=1),
              "scale": dict(seq=args.seq if not small else 64, batch=2, accum=4 if not small else 1),
              "preference": dict(seq=96, batch=8 if not small else 2, accum=1)}
    runs = []
    for precision in precisions:
        for model in [m for m in models if args.only in ("", m)]:
            # Liger Kernel goes on by default only once its loss is measured equal to transformers' own.
            trainers = ("ours dpo", "ours orpo") if model == "preference" else \
                ("ours", "ours + Liger", "trl") if not small else ("ours", "trl")
            for trainer in trainers:
                runs.append(dict(models[model], precision=precision, model=model, trainer=trainer,
                                 steps=args.steps, model_dir=model_dir,
                                 output=f"{args.output}/{precision}-{model}-{trainer}"))
    return runs


def longest(args, model_dir: str, trainer: str) -> int:
    """The longest row (doubling from --seq) that trains at batch 1 under the T4 cap; 0 if none."""
    seq, best = args.seq if gpu() else 64, 0
    while seq <= (32768 if gpu() else 64):
        spec = dict(precision="t4", model="scale", trainer=trainer, steps=2, batch=1, accum=1, seq=seq,
                    model_dir=model_dir, output=f"{args.output}/longest-{trainer}-{seq}")
        if not in_fresh_process(spec)["fits"]:
            break
        best, seq = seq, seq * 2
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=1024, help="tokens per row of the scale runs")
    p.add_argument("--only", default="", choices=("", "quality", "scale", "preference", "longest"))
    p.add_argument("--output", default="runs/gpu-check")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from train_speed import machine
    model_dir = str(build_scale_model(Path(args.output) / "scale-model"))
    rows = [] if args.only == "longest" else [
        {k: spec[k] for k in ("precision", "model", "trainer", "seq")} | in_fresh_process(spec)
        for spec in plan(args, model_dir)]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    reach = {t: longest(args, model_dir, t) for t in ("ours", "trl")} if args.only in ("", "longest") else {}
    print(f"longest row that trains under the {CAP_GIB} GiB cap (fp16, batch 1): " +
          ", ".join(f"{t} {n:,} tokens" for t, n in reach.items()))
    described = machine()
    name = (described["gpu"] or "cpu").lower().replace(" ", "-")
    path = (HERE / "results" if gpu() else Path(args.output)) / f"gpu_check-{name}-{datetime.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": described, "cap GiB": CAP_GIB, "steps": args.steps, "lora": LORA,
                                "runs": rows, "longest": reach}, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
