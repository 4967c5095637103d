"""Frozen weights held in bf16 while training under autocast: the values autocast computes
when it casts them on every pass, and the fp32 originals back after."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import adapter_grads, alpaca_batch, randomize_lora_b

from nb_finetune.kernels.dropout import fast_dropout_in
from nb_finetune.kernels.weights import frozen_weights_in


@pytest.fixture(scope="module")
def batch(shared_data, tokenizer):
    return alpaca_batch(shared_data, tokenizer)


def test_frozen_weights_held_in_bf16_give_the_same_bf16_results_and_come_back(tiny_model_dir, batch):
    """Under bf16 autocast, casting the frozen weights once computes what casting them on every
    forward pass computes, and so do adapters (with dropout) that take a bf16 input without
    peft's cast to fp32; afterwards the fp32 weights are the very tensors loaded and the
    adapters cast their input again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    with fast_dropout_in(model) as replaced:  # FastDropout: what takes the bf16 input in training
        assert replaced > 0
        model.train()
        adapted = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
        randomize_lora_b(model)
        frozen = {n: p.data for n, p in model.named_parameters() if "base_layer" in n}
        assert frozen and all(w.dtype == torch.float32 for w in frozen.values())

        def loss_and_grads():
            model.zero_grad()
            with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16):
                torch.manual_seed(1)  # the same dropout masks in both passes
                loss = model(**batch).loss
            loss.backward()
            return loss.detach(), adapter_grads(model)

        plain_loss, plain_grads = loss_and_grads()
        with frozen_weights_in(model, "bfloat16"):
            assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            assert all(m.cast_input_dtype_enabled is False for m in adapted)
            loss, grads = loss_and_grads()
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in adapted)
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-7, msg=name)
        assert all(p.dtype == torch.float32 and p.data_ptr() == frozen[n].data_ptr()  # the same storage
                   for n, p in model.named_parameters() if "base_layer" in n)
        with frozen_weights_in(model, "float32"):  # nothing to do in fp32
            assert all(p.dtype == torch.float32 for p in model.parameters())
