"""Writes docs/models.md, the model families the engine is tested with, by running each through
the same path a user takes: a folder with config, weights and the SmolLM2 tokenizer, then the
engine with `model.name` set to that folder.

    python docs/models_table.py

For every family it trains with the CPU kernels on and off (the losses must agree), runs QLoRA
(4-bit) steps, merges the adapter and exports GGUF f16 and q8_0 with the round trip. The
families and the tiny models are defined here once; tests/test_families.py uses the same ones.
"""
from __future__ import annotations

import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny decoder of every family: 2 layers, 64 wide, 4 query and 2 key/value heads of 16.
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "tie_word_embeddings": True}
# Mixture-of-experts families: 4 experts of 64, 2 per token (their defaults have up to 128).
EXPERTS = {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
# The families the engine is tested with, by transformers' model_type, with what each needs
# beyond SIZES. Those after smollm3 are families the issue did not name, tried to find what
# breaks in the engine (docs/models.md says what was found).
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {},
    "granite": {}, "olmo2": {}, "smollm3": {},
    "qwen3_moe": EXPERTS, "mixtral": EXPERTS, "olmoe": EXPERTS, "granitemoe": EXPERTS,
    "cohere": {}, "starcoder2": {}, "stablelm": {}, "glm": {}, "exaone4": {},
}
QUANTS = ("f16", "q8_0")


def build(model_type: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A random-weight `model_type` decoder saved in `folder` with the tokenizer from `tokenizer_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                  **SIZES, **FAMILIES.get(model_type, {}))
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
    from nb_finetune.export import gguf_file
    return model_type in gguf_file.ARCHITECTURES


def row(model_type: str, tokenizer_dir: Path, work: Path, frame) -> dict:
    """One family through the whole path; what worked and the round trip's figures."""
    import numpy as np

    from nb_finetune.export import export_gguf
    folder = build(model_type, tokenizer_dir, work / model_type)
    losses = {}
    for setting in ("off", "auto"):
        session = trained(run_config(folder, work / f"{model_type}-{setting}", setting, lora_dropout=0.0), frame)
        losses[setting] = session.train_result.history["train_loss"].to_numpy()
    applies = kernels_for(folder, work)
    qlora = trained(run_config(folder, work / f"{model_type}-qlora", quantization="4bit"), frame)
    result = {"family": model_type, "lora": bool(np.allclose(losses["auto"], losses["off"], rtol=1e-4)),
              "qlora": bool(np.isfinite(qlora.train_result.history["train_loss"]).all()), "kernels": applies,
              "gguf": gguf_supported(model_type), "round trip": {}}
    for quant in QUANTS if result["gguf"] else ():
        export = export_gguf(qlora.cfg, qlora.train_result.adapter_dir, work / f"{model_type}-{quant}", quant,
                             progress=lambda m: None)
        result["round trip"][quant] = export.roundtrip
    return result


def kernels_for(folder: Path, work: Path) -> dict:
    """kernels.applicable for the family's model with adapters as the engine adds them."""
    from nb_finetune import kernels, modeling
    cfg = run_config(folder, work / "unused").model
    base = modeling.load_base(cfg, "completion", progress=lambda m: None)
    return kernels.applicable(modeling.add_lora(base, cfg, "completion"))
