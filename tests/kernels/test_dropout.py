"""FastDropout against nn.Dropout: the same distribution and gradients (masks cannot match,
they come from another generator), and peft's dropout modules swapped in and put back."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import lora_model

from nb_finetune.kernels.dropout import FastDropout, fast_dropout_in


def test_fast_dropout_draws_the_dropout_distribution():
    """FastDropout keeps each element with probability 1 - p, scales by 1/(1 - p), follows
    torch's seed, passes gradients through the mask and is the identity in eval mode."""
    drop = FastDropout(0.1).train()
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 65536 / (65536 - round(0.1 * 65536))))
    assert out.mean().item() == pytest.approx(1.0, abs=0.004)
    rows, cols = kept.float().mean(1), kept.float().mean(0)  # no striping along either axis
    assert rows.std().item() < 0.03 and cols.std().item() < 0.03
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # the seed decides the mask
    assert not torch.equal(drop(x), out)  # and each call draws a new one

    w = torch.randn(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    drop(w).sum().backward()
    torch.manual_seed(3)
    assert torch.equal(w.grad, drop(torch.ones(400, 1000)))  # d out / d x = mask / (1 - p)
    # bf16 input: x * scale computed in fp32 and rounded once, forward and backward
    xb = torch.randn(400, 1000).bfloat16().requires_grad_()
    torch.manual_seed(5)
    half = drop(xb)
    torch.manual_seed(5)
    mask = drop(torch.ones(400, 1000))  # 0 or scale, the same draw
    assert half.dtype == torch.bfloat16 and torch.equal(half, (xb.detach().float() * mask).bfloat16())
    g = torch.randn(400, 1000).bfloat16()
    half.backward(g)
    assert xb.grad.dtype == torch.bfloat16 and torch.equal(xb.grad, (g.float() * mask).bfloat16())
    assert torch.equal(drop.eval()(x), x)


def test_fast_dropout_under_autocast_writes_what_the_cast_would_have_made():
    """Under bf16 autocast FastDropout writes its output in bf16 (the adapter's matmul would
    cast it anyway): the same values and the same gradient as dropout in fp32 and then the cast."""
    drop = FastDropout(0.05).train()
    x = torch.randn(64, 576, requires_grad=True)
    torch.manual_seed(1)
    plain = drop(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        out = drop(x)
    assert plain.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, plain.to(torch.bfloat16)) and (out == 0).any()
    g = torch.randn(64, 576).to(torch.bfloat16)
    out.backward(g)
    grad, x.grad = x.grad, None
    plain.to(torch.bfloat16).backward(g)
    assert grad.dtype == torch.float32 and torch.equal(grad, x.grad)


def test_lora_dropout_layers_are_swapped_for_fast_dropout_and_put_back(tiny_model_dir):
    """Inside fast_dropout_in every adapter's nn.Dropout is a FastDropout with its p and its
    mode; afterwards the very nn.Dropout modules are back, in the mode the model was left in."""
    model = lora_model(tiny_model_dir, lora_dropout=0.1).train()
    own = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Dropout and m.p > 0}
    assert len(own) == 14  # 7 adapted layers in each of 2 blocks
    with fast_dropout_in(model) as replaced:
        assert replaced == 14
        drops = [m for m in model.modules() if isinstance(m, FastDropout)]
        assert len(drops) == 14 and all(d.p == 0.1 and d.training for d in drops)
        assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
        with fast_dropout_in(model) as again:
            assert again == 0  # nothing left to swap
        model.eval()  # the mode set meanwhile is the one the originals come back in
    back = dict(model.named_modules())
    assert all(back[name] is m for name, m in own.items())
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert not any(m.training for m in own.values())


def test_dropout_is_put_back_when_training_fails(tiny_model_dir):
    model = lora_model(tiny_model_dir, lora_dropout=0.1)
    with pytest.raises(RuntimeError, match="step failed"), fast_dropout_in(model):
        raise RuntimeError("step failed")
    assert not any(isinstance(m, FastDropout) for m in model.modules())
