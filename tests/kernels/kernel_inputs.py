"""Inputs the kernels' tests share (a helper module, not a test file: imported by name from
the tests in this folder)."""
from __future__ import annotations

import json

import pandas as pd
import torch


def alpaca_batch(shared_data, tokenizer, rows: int = 6, max_length: int = 192) -> dict:
    """A padded training batch of the first Alpaca demo rows, as the trainer's collator makes it."""
    from nb_finetune import config, data
    from nb_finetune.data.collator import CompletionOnlyCollator
    from nb_finetune.data.formatter import Formatter
    from nb_finetune.data.tokens import tokenize_frame
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[:rows], config.DataConfig(task="completion"))
    dataset, _ = tokenize_frame(frame, Formatter.build(tokenizer, "completion", [], max_length=max_length))
    return CompletionOnlyCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def lora_model(model_dir=None, lora_dropout: float = 0.05, **model):
    """nb_finetune's LoRA model for a causal-LM objective, as a session loads it (peft's own
    layers); SmolLM2-135M-Instruct without `model_dir`."""
    from nb_finetune import config, modeling
    mcfg = config.ModelConfig(lora_dropout=lora_dropout, **model, **({"name": str(model_dir)} if model_dir else {}))
    return modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")


def randomize_lora_b(model, std: float = 0.02) -> None:
    """A trained-looking adapter (B is zero at first), so every adapter's path counts in the result."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def adapter_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
