"""The short-row attention against torch's sdpa (transformers' sdpa function): the same
forward, gradients at least as near a float64 computation, each mask built once per pass,
and sdpa for whatever it does not cover."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import lora_model, randomize_lora_b
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nb_finetune import config, data, hardware
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import tokenize_frame
from nb_finetune.kernels import attention
from nb_finetune.kernels.attention import SHORT_ROWS, ShortRowAttention

# Whole-model checks under bf16 autocast need a CPU with bf16: elsewhere torch emulates it (many
# minutes for SmolLM2), and training there runs in fp32, which the fp32 cases cover.
needs_fast_bf16 = pytest.mark.skipif(not hardware.bf16_supported(), reason="this CPU has no bf16; training here is fp32")


def _attention_inputs(length: int, padded: int = 0, packed: bool = False, dtype=torch.bfloat16):
    """SmolLM2's attention shape (9 query heads over 3 key/value heads of 64), a causal mask
    with right padding on the first row or two rows packed into the second."""
    torch.manual_seed(0)
    query = torch.randn(2, 9, length, 64, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(2, 3, length, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    allowed = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
    if padded:
        allowed[0, :, :, length - padded:] = False
    if packed:
        half = length // 2
        allowed[1, :, half:, :half] = False
    return query, key, value, allowed


class _Module:  # what the attention function reads from transformers' attention module
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("length,padded,packed", [(64, 0, False), (80, 13, False), (150, 0, True)])
def test_short_row_attention_backward_is_as_exact_as_torchs(length, padded, packed):
    """The CPU attention for short rows: the same forward as torch's sdpa, and gradients at least
    as near a float64 computation as sdpa's own (the mask: causal, padded or packed; grouped
    heads)."""
    query, key, value, allowed = _attention_inputs(length, padded, packed)
    grad_out = torch.randn(2, length, 9, 64, dtype=torch.bfloat16)
    mask = None if not (padded or packed) else allowed  # transformers leaves out a purely causal mask

    def run(fn, tensors):
        out = fn(_Module(), *tensors, mask, scaling=64 ** -0.5)[0]
        return out, torch.autograd.grad(out, tensors, grad_out.to(out.dtype))

    def distance(found, exact):
        return max(float((f.double() - e).norm() / e.norm()) for f, e in zip(found, exact))

    _, exact_grads = run(sdpa_attention_forward, [t.detach().double().requires_grad_()
                                                  for t in (query, key, value)])
    sdpa_out, sdpa_grads = run(sdpa_attention_forward, [query, key, value])
    short = ShortRowAttention()
    out, grads = run(short, [query, key, value])
    assert short.masks_built == 1  # the short-row path ran (sdpa builds no stacked mask)
    torch.testing.assert_close(out, sdpa_out, rtol=0, atol=0)
    assert distance(grads, exact_grads) <= distance(sdpa_grads, exact_grads)


def test_short_row_attention_builds_each_mask_once_and_never_reuses_a_stale_one():
    """The layers of one pass share the stacked mask; a new mask of the same shape (the next
    batch's padding) gets its own, and each output is torch's for the mask it was given."""
    query, key, value, first = _attention_inputs(80, padded=13)
    second = first.clone()
    second[0, :, :, 80 - 13:] = True
    second[1, :, :, 80 - 30:] = False  # the same shape, other rows padded
    short = ShortRowAttention()
    masks = (first, first, second, second, first)
    outs, built = [], []
    for mask in masks:
        outs.append(short(_Module(), query, key, value, mask, scaling=0.125)[0])
        built.append(short.masks_built)
        assert short.last_mask[0] is mask  # the mask held is the one this call was given
    assert built == [1, 1, 2, 2, 3]  # built again only when the mask changed
    for out, mask in zip(outs, masks):
        want = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.125)[0]
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert short.stacked_mask(first, 80, 3, torch.bfloat16, query.device) is \
        short.stacked_mask(first, 80, 3, torch.bfloat16, query.device)  # built once, then reused
    assert ShortRowAttention().stacked_mask(first, 80, 3, torch.bfloat16, query.device) is not \
        short.stacked_mask(first, 80, 3, torch.bfloat16, query.device)  # each instance its own
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (query, key, value))
    assert all(torch.isfinite(g).all() for g in grads)


def test_long_rows_and_no_gradient_go_to_torchs_attention():
    """Past SHORT_ROWS, or without a gradient, transformers' sdpa function computes it."""
    short = ShortRowAttention()
    query, key, value, _ = _attention_inputs(SHORT_ROWS + 8)
    out = short(_Module(), query, key, value, None, scaling=0.125)[0]
    torch.testing.assert_close(out, sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.125)[0],
                               rtol=0, atol=0)
    query, key, value, _ = _attention_inputs(64)
    with torch.no_grad():
        short(_Module(), query, key, value, None, scaling=0.125)
    assert short.masks_built == 0
    assert not attention.applies(_Module(), query, key, None, 0.1, None, {})  # attention dropout
    assert not attention.applies(_Module(), query, key, None, 0.0, None, {"softcap": 30.0})
    short(_Module(), query, key, value, None, scaling=0.125)
    assert short.masks_built == 1


def test_for_training_registers_a_fresh_attention_and_takes_it_out_after(tiny_model_dir):
    """Each training run gets its own instance (no mask held over from another run or model);
    afterwards, and after a failure, the model is on sdpa and the name is out of transformers'
    table; a model type not checked keeps sdpa."""
    model = lora_model(tiny_model_dir)
    cfg = model.get_base_model().config
    assert cfg._attn_implementation == "sdpa"
    seen = []
    for _ in range(2):
        with attention.for_training(model) as applies:
            assert applies and cfg._attn_implementation == attention.NAME
            seen.append(ALL_ATTENTION_FUNCTIONS[attention.NAME])
        assert cfg._attn_implementation == "sdpa" and attention.NAME not in ALL_ATTENTION_FUNCTIONS
    assert all(isinstance(s, ShortRowAttention) for s in seen) and seen[0] is not seen[1]
    with pytest.raises(RuntimeError, match="step failed"), attention.for_training(model):
        raise RuntimeError("step failed")
    assert cfg._attn_implementation == "sdpa" and attention.NAME not in ALL_ATTENTION_FUNCTIONS
    cfg.model_type, cfg.attn_logit_softcapping = "gemma2", 50.0  # Gemma 2's soft-capped attention scores
    with attention.for_training(model) as applies:
        assert not applies and cfg._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", pytest.param("bfloat16", marks=needs_fast_bf16)])
def test_short_row_attention_in_training_keeps_the_loss_and_gradients(smollm2_dir, tokenizer, sst2_frame, precision):
    """SmolLM2-135M with LoRA on real SST-2 rows (padded, under 160 tokens): with the short-row
    attention the loss is sdpa's, and the adapter gradients differ from sdpa's by much less
    than bf16 autocast itself moves them from fp32 (the kernel alone is nearer float64 than
    sdpa's, test above), or in fp32 by float rounding; the model is on sdpa again afterwards."""
    frame = data.normalize(sst2_frame.iloc[:8], config.DataConfig(task="classification",
                                                                 label_names={"0": "negative", "1": "positive"}))
    rows, _ = tokenize_frame(frame, Formatter.build(tokenizer, "classification", ["negative", "positive"], 256))
    batch = CompletionOnlyCollator(tokenizer.pad_token_id, 8)([rows[i] for i in range(len(rows))])
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] <= SHORT_ROWS
    torch.manual_seed(0)
    model = lora_model(lora_dropout=0.0)
    randomize_lora_b(model)
    model.train()

    used_functions = []

    def loss_and_grads(short: bool, autocast: bool = True):
        model.zero_grad()
        with attention.for_training(model) if short else torch.enable_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            used = model.config._attn_implementation
            loss = model(**batch).loss
            used_functions.append(ALL_ATTENTION_FUNCTIONS.get(attention.NAME))
        loss.backward()
        return used, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    bf16 = precision == "bfloat16"
    used_before, own_loss, own = loss_and_grads(False, autocast=bf16)
    used, loss, grads = loss_and_grads(True, autocast=bf16)
    assert (used_before, used) == ("sdpa", attention.NAME) and model.config._attn_implementation == "sdpa"
    assert used_functions[-1].masks_built == 1  # one mask for every layer of the pass
    assert attention.NAME not in ALL_ATTENTION_FUNCTIONS  # taken out of transformers' table after
    if bf16:
        _, _, exact = loss_and_grads(False, autocast=False)
        assert loss == own_loss
        assert float((grads - own).norm()) < 0.5 * float((own - exact).norm())
    else:
        assert loss == pytest.approx(own_loss, rel=1e-5)
        assert float((grads - own).norm()) < 1e-4 * float(own.norm())
