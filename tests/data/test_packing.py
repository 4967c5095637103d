"""Packed rows compute what each row computes alone (SmolLM2, real Alpaca rows)."""
from __future__ import annotations

import pytest
import torch
from conftest import alpaca

from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import pack, tokenize_frame


@pytest.mark.slow
def test_packed_rows_give_each_row_the_logits_it_has_alone(smollm2_dir, tokenizer, shared_data, tmp_path):
    """SmolLM2 on real Alpaca rows: packed into shared rows and passed the way the trainer
    passes them, every original row gets the same logits and loss as when it is run alone,
    so packing changes how many rows a step holds, not what each row computes."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from nb_finetune.training.trainer import SafeTrainer
    frame = alpaca(shared_data, slice(20, 44))
    fmt = Formatter.build(tokenizer, "completion", [], max_length=256)
    rows, _ = tokenize_frame(frame, fmt)
    packed = pack(rows, 256)
    assert len(packed) < len(rows)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    collate = CompletionOnlyCollator(tokenizer.pad_token_id)
    batch = collate([packed[i] for i in range(len(packed))])
    seen = {}
    captured = model.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    with torch.no_grad():
        packed_loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    captured.remove()
    assert "attention_mask" not in seen and seen["use_cache"] is False
    packed_logits = out.logits
    with torch.no_grad():
        for r, row in enumerate(packed.features):
            starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed_logits[r, a:b], alone, rtol=1e-4, atol=2e-4)
        unpacked = collate([rows[i] for i in range(len(rows))])
        assert packed_loss.item() == pytest.approx(model(**unpacked).loss.item(), rel=1e-4)
