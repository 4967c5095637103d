"""Frozen weights held in the compute dtype while training under autocast."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.helpers import disable_input_dtype_casting


@contextmanager
def frozen_weights_in(model, precision: str):
    """Hold the frozen weights of the adapted linear layers in `precision` while training, and
    let their adapters take the input in the dtype it comes in.

    Under bf16 autocast every linear layer casts its fp32 weight to bf16 on every forward
    pass (autocast caches only weights that are trained): a full copy of the model per step.
    Casting the frozen weights once gives the same bf16
    values, so the same results. The fp32 originals are put back afterwards, so evaluation
    and export see the weights as loaded.

    peft casts an adapter's input to the adapter's dtype (fp32) before its dropout and first
    matmul. Under autocast that matmul casts it straight back to bf16, so for an input that
    is already bf16 (the MLP's down projection takes the product of two adapted layers) the
    round trip is a pass over the activations each way for nothing: FastDropout computes the
    same values from the bf16 input (tests/kernels/test_weights.py)."""
    dtype = getattr(torch, precision)
    half = precision in ("bfloat16", "float16")
    originals = []
    if half:
        for module in model.modules():
            base = getattr(module, "base_layer", None)  # a LoRA-wrapped layer's frozen part
            if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad \
                    and base.weight.dtype == torch.float32:
                originals.append((base, base.weight.data))
                base.weight.data = base.weight.data.to(dtype)
    try:
        with disable_input_dtype_casting(model, active=half):
            yield
    finally:
        for base, weight in originals:
            base.weight.data = weight
