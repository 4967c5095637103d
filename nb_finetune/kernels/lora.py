"""peft's LoRA Linear, moving less memory on a CPU (FastLoraLinear), and the sharing of work
between adapted layers that read one input.

peft builds FastLoraLinear in place of its own Linear through its custom-module dispatch
(`dispatch_fast_lora`, called where the adapter is added). The layer runs peft's own forward
until `fast_lora_in` switches its fast path on for a training run."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear

from .dropout import FastDropout

# Adapted layers that read one and the same input tensor, by their names in the model types
# whose layers are separate (Llama, Mistral, Qwen2/3, Gemma, OLMo 2, SmolLM3); Phi-3 has
# them as one layer already (qkv_proj, gate_up_proj).
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SameInput:
    """The adapters of layers that read one input (a block's q, k and v; its gate and up)
    share the work on it while training: one cast to the compute dtype, one dropout mask, one
    matmul through their A matrices stacked. The first of them to run does it; the others
    take their part if they are called with the very tensor it was done for (and it has not
    been changed in place), and do their own work otherwise, as they do on tensors made
    under torch.inference_mode (which keep no count of in-place changes)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.clear()

    def clear(self):
        self.x = self.version = self.cast = None
        self.parts: dict = {}  # layer -> its [.., r] slice of the stacked first matmul

    def take(self, layer, x, adapter: str, cut: int, autocast: bool):
        if x.is_inference():  # no version counter to tell an in-place change: each on its own
            return None
        if self.x is x and self.version == x._version and layer in self.parts:
            h, cast = self.parts.pop(layer), self.cast
            if not self.parts:
                self.clear()
            return cast, h
        if not all(other.fast_path_for() == adapter and _dropout_cut(other.lora_dropout[adapter], x) == cut
                   for other in self.layers):
            return None
        cast, masked = _cast_and_mask(x, layer.lora_dropout[adapter], cut, autocast)
        weights = [other.lora_A[adapter].weight for other in self.layers]
        hs = torch.nn.functional.linear(masked, torch.cat(weights)).split([w.shape[0] for w in weights], -1)
        self.x, self.version, self.cast = x, x._version, cast
        self.parts = {other: h for other, h in zip(self.layers, hs) if other is not layer}
        return cast, hs[self.layers.index(layer)]


def _dropout_cut(dropout, x):
    """What an adapter's dropout does to x, for the fast path: FastDropout's cut (lanes below
    it are dropped) while it draws masks here, 0 where it does nothing (nn.Identity, which
    peft uses for dropout 0; FastDropout in eval mode), None otherwise (nn.Dropout)."""
    if isinstance(dropout, FastDropout):
        return dropout.cut if dropout.fast_for(x) else 0 if not dropout.training else None
    return 0 if isinstance(dropout, torch.nn.Identity) else None


def _cast_and_mask(x, dropout, cut: int, autocast: bool):
    """x in the compute dtype (what autocast would make of it for the frozen layer), and that
    with the dropped elements zeroed: one masked fill of the cast. The kept elements are not
    scaled here: 1 / (1 - p) is folded into the adapter's scale."""
    cast = x.to(torch.get_autocast_dtype(x.device.type)) if autocast else x
    return cast, dropout.zero_dropped(cast) if cut else cast


class FastLoraLinear(Linear):
    """peft's LoRA Linear, moving less memory: peft's values to rounding, but for one
    thing, the dropout mask that layers reading one input share (the third point).

    - The adapter's output is scaled and added inside its second matmul:
      `addmm(base(x), h, B.T, alpha=scaling)`. peft computes `result + lora_B(h) * scaling`,
      two passes over the layer's whole output forward (the scale, then the add) and one
      backward (the gradient times the scale); in addmm the scale falls on the rank-r side
      and the add is the matmul's accumulate. The sum is rounded once, where peft rounds the
      product, the scaled product and the sum.
    - While training with FastDropout: the input is cast to the compute dtype once for the
      frozen layer and the adapter (autocast casts it for each), the mask zeroes elements
      of that cast in one pass, and dropout's 1 / (1 - p) is folded into the scale.
    - Layers that read one input (SAME_INPUT) share that work: one cast, one mask, one
      matmul through their stacked A matrices (_SameInput). Their adapters then see the
      same dropout mask in a pass, as they do in models where those layers are one
      (Phi-3's qkv_proj), each still with dropout's own distribution.
    Anything but one plain adapter on an nn.Linear (adapters switched off, merged, several,
    mixed batches, DoRA and other variants, a bias on B, extra arguments, mixed dtypes
    outside autocast) goes to peft's own forward."""

    same_input = None  # a _SameInput, set by fast_lora_in
    fast = False  # the fast path is on: set by fast_lora_in for one training run

    def fast_path_for(self):
        """The adapter's name if this layer's call can take the fast path, else None."""
        if not self.fast:
            return None
        adapters = self.active_adapters
        if self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] not in self.lora_A \
                or adapters[0] in self.lora_variant or self.lora_bias.get(adapters[0], False):
            return None
        return adapters[0]

    def forward(self, x, *args, **kwargs):
        name = None if args or kwargs else self.fast_path_for()
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout, scale = self.lora_dropout[name], self.scaling[name]
        autocast = torch.is_autocast_enabled(x.device.type)
        cut = _dropout_cut(dropout, x)
        if cut is None or not (autocast or x.dtype == lora_a.weight.dtype):
            result = self.base_layer(x)
            h = lora_a(dropout(self._cast_input_dtype(x, lora_a.weight.dtype)))
        else:
            taken = self.same_input.take(self, x, name, cut, autocast) if self.same_input else None
            if taken is None:
                cast, masked = _cast_and_mask(x, dropout, cut, autocast)
                taken = cast, lora_a(masked)
            x, h = taken
            result = self.base_layer(x)
            if cut:
                scale *= dropout.keep_scale
        if not autocast and not result.dtype == h.dtype == lora_b.weight.dtype:
            return (result + lora_b(h) * scale).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                          lora_b.weight.t(), alpha=scale)
        return out.view(result.shape)


class ExactType(type):
    """A class that `isinstance` matches to exactly `exact`, not to its subclasses: peft's
    dispatch asks isinstance, and bitsandbytes' 4- and 8-bit layers are nn.Linear subclasses
    that FastLoraLinear must not take."""

    def __instancecheck__(cls, obj) -> bool:
        return type(obj) is cls.exact


class PlainLinear(metaclass=ExactType):
    exact = torch.nn.Linear


def dispatch_fast_lora(lora_config) -> bool:
    """Have peft build FastLoraLinear for each plain nn.Linear the adapter targets. False where
    this peft has no custom-module dispatch: its own Linear is built, and the kernel stays off."""
    register = getattr(lora_config, "_register_custom_module", None)
    if not callable(register):
        return False
    register({PlainLinear: FastLoraLinear})
    return True


def switchable(module) -> bool:
    """Whether `module` is a layer whose fast path fast_lora_in turns on: a FastLoraLinear on an
    nn.Linear whose weight is stored (out, in)."""
    return isinstance(module, FastLoraLinear) and type(module.base_layer) is torch.nn.Linear \
        and not module.fan_in_fan_out


@contextmanager
def fast_lora_in(model):
    """The fast path of the model's FastLoraLinear layers on, those that read one input grouped,
    and all off again after; yields how many layers were switched."""
    switched = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for child in children.values():
            if switchable(child):
                child.fast = True
                switched.append(child)
        for names in SAME_INPUT:
            layers = [children[n] for n in names if getattr(children.get(n), "fast", False)]
            if len(layers) > 1:
                group = _SameInput(layers)
                for layer in layers:
                    layer.same_input = group
    try:
        yield len(switched)
    finally:
        for layer in switched:
            for name in ("fast", "same_input"):
                vars(layer).pop(name, None)
