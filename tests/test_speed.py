"""The speed-ups keep the result: each one is checked against the plain computation.

The speeds themselves are measured by benchmarks/train_speed.py, never here.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from nb_finetune import config, data, engine, modeling
from nb_finetune.tokenization import IGNORE, CompletionOnlyCollator, Formatter, tokenize_frame


@pytest.fixture(scope="module")
def alpaca_batch(shared_data, tokenizer):
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[:6], config.DataConfig(task="completion"))
    fmt = Formatter.build(tokenizer, "completion", [], max_length=192)
    dataset, _ = tokenize_frame(frame, fmt)
    return CompletionOnlyCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def test_trained_positions_pick_the_positions_before_each_trained_token():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    keep, following = engine.trained_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert following.tolist() == [7, 8, 5]


@pytest.mark.slow
def test_logits_at_trained_positions_only_give_the_same_loss_and_gradients(smollm2_dir, alpaca_batch, tmp_path):
    """SmolLM2-135M with LoRA on real Alpaca rows: the trainer's loss with the vocabulary
    projection at trained positions only equals the full one, and so do the adapter gradients."""
    from transformers import TrainingArguments
    mcfg = config.ModelConfig()
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    model.train()
    assert engine.keeps_logits_selectively(model)
    trained = int((alpaca_batch["labels"] != IGNORE).sum())
    assert 0 < trained < alpaca_batch["labels"].numel() * 0.9  # prompts and padding are not trained

    def loss_and_grads(selective: bool):
        trainer = engine._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                            report_to="none"))
        trainer.trained_logits_only = selective
        model.zero_grad()
        with torch.random.fork_rng():  # the same dropout masks in both passes
            torch.manual_seed(1)
            loss = trainer.compute_loss(model, dict(alpaca_batch), num_items_in_batch=torch.tensor(trained))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_classification_head_keeps_its_usual_loss(tiny_model_dir):
    """Models without `logits_to_keep` (sequence classification) train as before."""
    from transformers import AutoModelForSequenceClassification
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert not engine.keeps_logits_selectively(head)


def test_frozen_weights_held_in_bf16_give_the_same_bf16_results_and_come_back(tiny_model_dir, alpaca_batch):
    """Under bf16 autocast, casting the frozen weights once computes what casting them on every
    forward pass computes; afterwards the fp32 weights are the very tensors loaded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter, so its path counts in the result
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    frozen = {n: p.data for n, p in model.named_parameters() if "base_layer" in n}
    assert frozen and all(w.dtype == torch.float32 for w in frozen.values())

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**alpaca_batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads()
    with engine.frozen_weights_in(model, "bfloat16"):
        assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-7, msg=name)
    assert all(p.dtype == torch.float32 and p.data_ptr() == frozen[n].data_ptr()  # the same storage
               for n, p in model.named_parameters() if "base_layer" in n)
    with engine.frozen_weights_in(model, "float32"):  # nothing to do in fp32
        assert all(p.dtype == torch.float32 for p in model.parameters())
