"""Writes docs/models.md, the model families the engine is tested with, by running each through
the same path a user takes: a folder with config, weights and the SmolLM2 tokenizer, then the
engine with `model.name` set to that folder.

    python docs/models_table.py

For every family it trains with the CPU kernels on and off (the losses must agree), runs QLoRA
(4-bit) steps, merges the adapter and exports GGUF f16 and q8_0 with the round trip. The
families and the tiny models are defined here once; tests/integration/test_families.py uses the same ones.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny decoder of every family: 2 layers, 64 wide, 4 query and 2 key/value heads of 16.
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "tie_word_embeddings": True}
# Mixture-of-experts families: 4 experts of 64, 2 per token (their defaults have up to 128).
EXPERTS = {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
# Gemma scales attention by query_pre_attn_scalar, llama.cpp by the head size: the real Gemmas
# have both at 256, and transformers' GGUF loader (the round trip's reader) assumes a scalar of
# 256 whatever the file says, so the tiny Gemmas have the real head size.
GEMMA = {"head_dim": 256, "query_pre_attn_scalar": 256}
# transformers' GGUF loader does not read Qwen3's head size back and takes its default, 128 (the
# real Qwen3 models' head size), so the tiny Qwen3 has it too.
QWEN3 = {"head_dim": 128}
# The families the engine is tested with, by transformers' model_type, with what each needs
# beyond SIZES. Those after smollm3 are families the issue did not name, tried to find what
# breaks in the engine (docs/models.md says what was found).
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": QWEN3, "gemma2": GEMMA, "gemma3_text": GEMMA, "phi3": {},
    "granite": {}, "olmo2": {}, "smollm3": {},
    "qwen3_moe": EXPERTS, "mixtral": EXPERTS, "olmoe": EXPERTS, "granitemoe": EXPERTS,
    "cohere": {}, "starcoder2": {}, "stablelm": {}, "glm": {}, "exaone4": {},
}
# What the engine needs set for a family, beyond run_config's defaults: peft adapts the experts of
# these mixture-of-experts families as parameters (lora.ParamWrapper), which take no dropout.
SETTINGS = {"qwen3_moe": {"lora_dropout": 0.0}, "mixtral": {"lora_dropout": 0.0}, "olmoe": {"lora_dropout": 0.0}}
QUANTS = ("f16", "q8_0")


def build(model_type: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A random-weight `model_type` decoder saved in `folder` with the tokenizer from `tokenizer_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                  **SIZES | FAMILIES.get(model_type, {}))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model_dir: Path, output_dir: Path, cpu_kernels: str = "auto", quantization: str = "none",
               **model):
    """SST-2 classification on `model_dir`: 3 steps of 4 rows in fp32, validation at the end."""
    from nb_finetune import RunConfig
    return RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.1},
        "model": {"name": str(model_dir), "lora_r": 4, "lora_alpha": 8, "compute_dtype": "float32",
                  "quantization": quantization} | model,
        "train": {"output_dir": str(output_dir), "max_steps": 3, "batch_size": 4, "eval_steps": 3,
                  "logging_steps": 1, "max_length": 64, "learning_rate": 1e-2, "cpu_kernels": cpu_kernels}})


def trained(cfg, frame, callbacks=()):
    """A Session that trained `cfg` on `frame`, saying nothing."""
    from nb_finetune.pipeline import Session
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(frame)
    session.load_model()
    session.train(callbacks)
    return session


def sst2_rows(shared_data: Path = SHARED_DATA):
    """40 SST-2 rows, 20 of each class (tests/conftest.py's sst2_frame)."""
    import pandas as pd
    frame = pd.read_csv(shared_data / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    return frame.groupby("label").head(20).reset_index(drop=True)


def gguf_supported(model_type: str) -> bool:
    """Whether the GGUF writer takes this family: the writer's own list."""
    from nb_finetune.export import gguf_layout
    return model_type in gguf_layout.FAMILIES


def row(model_type: str, tokenizer_dir: Path, work: Path, frame) -> dict:
    """One family through the whole path; what worked and the round trip's figures."""
    import numpy as np

    from nb_finetune import UserError
    from nb_finetune.export import export_gguf
    folder = build(model_type, tokenizer_dir, work / model_type)
    losses = {}
    for setting in ("off", "auto"):
        session = trained(run_config(folder, work / f"{model_type}-{setting}", setting, lora_dropout=0.0), frame)
        losses[setting] = session.train_result.history["train_loss"].to_numpy()
    applies = kernels_for(folder, work, SETTINGS.get(model_type, {}))
    qlora = trained(run_config(folder, work / f"{model_type}-qlora", quantization="4bit",
                               **SETTINGS.get(model_type, {})), frame)
    result = {"family": model_type, "lora": bool(np.allclose(losses["auto"], losses["off"], rtol=1e-4)),
              "qlora": bool(np.isfinite(qlora.train_result.history["train_loss"]).all()), "kernels": applies,
              "gguf": gguf_supported(model_type), "round trip": {}}
    for quant in QUANTS if result["gguf"] else ():
        try:
            export = export_gguf(qlora.cfg, qlora.train_result.adapter_dir, work / f"{model_type}-{quant}", quant,
                                 progress=lambda m: None)
        except UserError as err:  # a round trip that failed: the table says so
            print(f"{model_type} {quant}: {err}", flush=True)
            result["gguf"] = False
            result["round trip"][quant] = str(err).split("FAILED: ")[-1]
            continue
        result["round trip"][quant] = export.roundtrip
    return result


def kernels_for(folder: Path, work: Path, settings: dict) -> dict:
    """kernels.applicable for the family's model with adapters as the engine adds them."""
    from nb_finetune import kernels, modeling
    cfg = run_config(folder, work / "unused", **settings).model
    base = modeling.load_base(cfg, "completion", progress=lambda m: None)
    return kernels.applicable(modeling.add_lora(base, cfg, "completion"))


def cells(result: dict) -> list[str]:
    """A family's row of the table."""
    yes = {True: "yes", False: "no"}
    applies = ", ".join(name for name, on in result["kernels"].items() if on) or "none"
    checks = result["round trip"]
    figures = "; ".join(f"{q}: failed, {c}" if isinstance(c, str) else
                        f"{q}: {c.max_logit_diff:.2%}, top token {c.top1_same}/{c.clear}, stop "
                        f"{sum(c.stops)}/{len(c.stops)}" for q, c in checks.items()) or "not supported yet"
    gguf = yes[result["gguf"]]
    return [f"`{result['family']}`", yes[result["lora"]], yes[result["qlora"]], applies, gguf, figures]


def table(rows: dict[str, list[str]]) -> str:
    """The table, one row per family in FAMILIES' order; `rows` maps a family to its cells."""
    head = ["family", "LoRA", "QLoRA", "CPU kernels that apply", "GGUF", "round trip (largest logit difference, "
            "top token same where clear, stops at end-of-turn)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [f"`{f}`" for f in FAMILIES]
    ordered = sorted(rows, key=lambda f: order.index(f) if f in order else len(order))
    return "\n".join(lines + ["| " + " | ".join(rows[f]) + " |" for f in ordered])


START, END = "<!-- table: python docs/models_table.py -->", "<!-- end of table -->"


def page(text: str, results: list[dict]) -> str:
    """docs/models.md's `text` with the rows of `results` put in (a family's row replaced, the
    others kept, so one family can be run again alone)."""
    before, rest = text.split(START)
    old, after = rest.split(END, 1)
    rows = {line.split(" | ")[0].removeprefix("| "): line.strip("| \n").split(" | ")
            for line in old.strip().splitlines()[2:]}
    rows |= {f"`{r['family']}`": cells(r) for r in results}
    return before + START + "\n" + table(rows) + "\n" + END + after


def main(families: list[str]) -> None:
    import tempfile

    from nb_finetune import assets
    tokenizer_dir = assets.model_path("smollm2-135m-instruct", progress=lambda m: None)
    frame, results = sst2_rows(), []
    with tempfile.TemporaryDirectory() as work:
        for model_type in families:
            print(f"{model_type} ...", flush=True)
            results.append(row(model_type, tokenizer_dir, Path(work), frame))
            out = Path(__file__).with_name("models.md")  # after each family: a crash keeps the rows before it
            out.write_text(page(out.read_text(encoding="utf-8"), results[-1:]), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
