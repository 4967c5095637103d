"""Attention for training on a CPU: torch's flash kernel forward, a shorter backward for short rows.

torch's CPU flash-attention backward has a large fixed cost whatever the length, and short
rows are the common case for fine-tuning data (SST-2 rows are 55-75 tokens). Here the forward
is still torch's flash kernel, which also returns each row's log-sum-exp, and the backward
recomputes the probabilities from it with plain batched matmuls over the whole
[length x length] blocks:

    P = exp(scale Q K^T - lse)   (fp32, masked)
    dV = P^T dO                  dS = P * (dO V^T - rowsum(dO * O))
    dQ = scale dS K              dK = scale dS^T Q

The backward is computed in fp32: at these lengths its five matmuls are cheap even so, and
the gradients come out nearer a float64 computation than the flash kernel's
(tests/kernels/test_attention.py). Past `SHORT_ROWS` tokens the blocks outgrow the cache and
torch's own backward is faster, so longer batches keep it.

It is switched on for training only (`for_training`), for the model types whose attention
takes the standard arguments; anything else (a longer batch, attention dropout, soft-capping,
a position bias, no gradient) goes to transformers' own sdpa function unchanged."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .models import plain_attention

NAME = "nb_finetune_cpu_sdpa"
# Longest batch (tokens) that uses the backward here; longer rows go to torch's own backward,
# which holds its own from about this length on.
SHORT_ROWS = 160


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, allowed, bias, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=bias, scale=scale)[:2]
        ctx.save_for_backward(query, key, value, out, lse, allowed)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, allowed = ctx.saved_tensors
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        # All in fp32: at these lengths the five matmuls are cheap even so, and the gradients
        # come out nearer a float64 computation than the flash kernel's.
        q, k, v, o, g = (t.float() for t in (query, key, value, out, grad_out))
        # P: scale Q K^T - lse in one batched matmul, then exp, zero where masked
        prob = torch.baddbmm(lse.reshape(batch * heads, q_len, 1), q.flatten(0, 1),
                             k.flatten(0, 1).transpose(1, 2), beta=-1, alpha=ctx.scale)
        prob = prob.view(batch, heads, q_len, k_len).exp_().masked_fill_(~allowed, 0)
        grad_value = torch.matmul(prob.transpose(-1, -2), g)
        grad_scores = torch.matmul(g, v.transpose(-1, -2)).sub_((g * o).sum(-1, keepdim=True)).mul_(prob)
        grad_query = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        dtype = query.dtype
        return grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype), None, None, None


def applies(module, query, key, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether a call is one this attention computes: training on a CPU, short causal rows
    with a boolean mask (or none), and none of the extras (dropout, soft-capping, ...)."""
    length = query.shape[2]
    plain = (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and kwargs.get("s_aux") is None and not kwargs.get("output_attentions"))
    return (plain and torch.is_grad_enabled() and query.requires_grad and query.device.type == "cpu"
            and 1 < length <= SHORT_ROWS and key.shape[2] == length
            and is_causal is not False and getattr(module, "is_causal", True)
            and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1)))


class ShortRowAttention:
    """transformers' attention-interface function, with the masks of the current pass.

    Every layer of a forward pass gets the same mask tensor: the stacked mask and its additive
    form are built once per pass (and saved once for the backward), not once per layer. The
    last mask is held, so a new mask is never mistaken for it."""

    def __init__(self):
        self.last_mask: tuple = ()
        self.masks_built = 0

    def stacked_mask(self, attention_mask, length: int, groups: int, dtype, device):
        """The [batch, 1, groups x length, length] allowed mask and its additive bias (0 / -inf)."""
        shape = (length, groups, dtype, device)
        if self.last_mask and self.last_mask[0] is attention_mask and self.last_mask[1] == shape:  # None: causal
            return self.last_mask[2]
        given = attention_mask
        if attention_mask is None:  # transformers leaves out a mask that is only causal
            attention_mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        allowed = attention_mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(
            attention_mask.shape[0], attention_mask.shape[1], groups * length, length)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        self.last_mask = (given, shape, (allowed, bias))
        self.masks_built += 1
        return self.last_mask[2]

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 **kwargs):
        if not applies(module, query, key, attention_mask, dropout, is_causal, kwargs):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # Under autocast the rotary embedding leaves Q and K in fp32 and V in bf16; sdpa would run
        # in the autocast dtype, and so does this.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        # Grouped heads: the query heads that share a key/value head are stacked along the length
        # (each query row attends on its own, so a [groups x length, length] block per key/value
        # head is the same attention), rather than the keys and values copied once per query head.
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        query = query.to(dtype).reshape(batch, kv_heads, groups * length, dim)
        key, value = (t.to(dtype).contiguous() for t in (key, value))
        allowed, bias = self.stacked_mask(attention_mask, length, groups, dtype, query.device)
        out = _ShortAttention.apply(query, key, value, allowed, bias, scale).view(batch, heads, length, dim)
        return out.transpose(1, 2).contiguous(), None


def applies_to(model) -> bool:
    """Whether training `model` (a peft model or a causal LM) uses this attention: a checked
    model type with plain attention scores, with sdpa, on the CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    return plain_attention(config) and config._attn_implementation == "sdpa" and base.device.type == "cpu"


@contextmanager
def for_training(model):
    """Use this attention while training `model` on a CPU, where it applies; sdpa again after,
    and the name taken out of transformers' tables. Yields whether it applies."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not applies_to(model):
        yield False
        return
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    # Registered class-wide: transformers builds a padding mask only for an attention name in the
    # mask table's class mapping (an instance's item is taken for a backend that needs no mask).
    ALL_ATTENTION_FUNCTIONS.register(NAME, ShortRowAttention())
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as sdpa
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
        for table in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
            type(table)._global_mapping.pop(NAME, None)  # transformers has no unregister
