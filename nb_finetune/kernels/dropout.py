"""LoRA dropout on a CPU: the mask drawn and applied at a fraction of nn.Dropout's cost."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


class _ScaledMask(torch.autograd.Function):
    """x where `keep`, times `scale`, else 0, cast to `dtype`; the same mask backward.

    For fp32 x the multiply is by an fp32 mask of 0 and scale, then the cast, so it rounds as
    x * scale (and autocast's cast after it) did. For bf16 or fp16 x (the input of a layer
    whose input another adapted layer made under autocast) the mask is 0 and 1 in that dtype,
    an exact multiply, then x * scale, which torch computes in fp32 and rounds once, as
    dropout on that dtype does. Only the boolean `keep` is saved for backward: an fp32 mask for
    the seven adapter inputs of every block would be four times the memory. Every step has one
    dtype in and out, because torch's CPU kernels that mix dtypes are much slower than a
    same-dtype multiply and a cast."""

    @staticmethod
    def forward(ctx, x, keep, scale, dtype):
        ctx.save_for_backward(keep)
        ctx.x_dtype, ctx.scale = x.dtype, scale
        return _ScaledMask.apply_mask(x, keep, scale).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _ScaledMask.apply_mask(grad.to(ctx.x_dtype), keep, ctx.scale), None, None, None

    @staticmethod
    def apply_mask(x, keep, scale):
        keep = keep.view(torch.uint8)  # torch converts bool to float several times slower than uint8
        if x.dtype == torch.float32:
            return keep.to(torch.float32).mul_(scale).mul_(x)
        return keep.to(x.dtype).mul_(x).mul_(scale)


class FastDropout(torch.nn.Module):
    """nn.Dropout whose mask and multiply cost a fraction as much on a CPU.

    peft applies dropout to the input of every adapted layer: seven full-width masks per
    transformer block. torch draws each mask element by element (`bernoulli_`), a large share
    of a CPU training step. Here 64-bit words from numpy's PCG64, seeded from torch's generator on every call (so
    `torch.manual_seed`, the Trainer's seed and its saved RNG states decide the masks), are
    cut into 16-bit lanes, one per element: each element is kept independently with
    probability 1 - p, p rounded to a multiple of 1/65536 (torch's own draw rounds it to
    2^-24), and scaled by 1/(1 - p). Same distribution, same expectation.

    Under autocast the output is in the autocast dtype: it feeds only the adapter's first
    matmul, which would cast it to that dtype anyway, so the values are the same. On other
    devices, or outside training, it is nn.functional.dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cut = round(p * 65536)  # lanes below this value are dropped

    def forward(self, x):
        if not self.fast_for(x):
            return torch.nn.functional.dropout(x, self.p, self.training)
        keep = ~self.dropped(x.shape)
        dtype = x.dtype
        if torch.is_autocast_enabled("cpu") and x.dtype == torch.float32:
            dtype = torch.get_autocast_dtype("cpu")
        return _ScaledMask.apply(x, keep, self.keep_scale, dtype)

    def fast_for(self, x) -> bool:
        """Whether this call draws its mask here (training, on a CPU, 0 < p < 1)."""
        return self.training and self.cut not in (0, 65536) and x.device.type == "cpu"

    @property
    def keep_scale(self) -> float:
        return 65536 / (65536 - self.cut)

    def zero_dropped(self, x) -> torch.Tensor:
        """x with the dropped elements zeroed and the kept ones as they are (the caller scales
        them by keep_scale): one masked fill, differentiable."""
        return x.masked_fill(self.dropped(x.shape), 0)

    def dropped(self, shape) -> torch.Tensor:
        """A boolean mask, True where an element is dropped (probability cut / 65536)."""
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        n = int(np.prod(shape))
        words = np.random.default_rng(seed).bit_generator.random_raw((n + 3) // 4)
        # Read as int16, a uniform 16-bit lane is uniform over [-32768, 32767], so it is
        # below cut - 32768 with probability cut / 65536: one vectorised int16 comparison in
        # torch (the lanes dropped are other ones than `uint16 < cut` picked; the law is the same).
        lanes = torch.from_numpy(words.view(np.int16)[:n])
        return torch.lt(lanes, self.cut - 32768).view(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def replaceable(layer) -> bool:
    """Whether an adapter's dropout is one FastDropout replaces (peft uses nn.Identity for p = 0)."""
    return type(layer) is torch.nn.Dropout and layer.p > 0


@contextmanager
def fast_dropout_in(model):
    """peft's adapter-input nn.Dropout modules replaced by FastDropout, and put back after;
    yields how many were replaced."""
    replaced = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in dropouts.items():
                if replaceable(layer):
                    dropouts[name] = FastDropout(layer.p).train(layer.training)
                    replaced.append((dropouts, name, layer))
    try:
        yield len(replaced)
    finally:
        for dropouts, name, layer in replaced:
            dropouts[name] = layer.train(dropouts[name].training)
