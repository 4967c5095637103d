"""CPU speed kernels, behind one switch: `train.cpu_kernels` (auto: on when training on a CPU; off).

Each kernel computes what peft and transformers compute, to rounding, in less time or memory
on a CPU, and each has an equivalence test in tests/kernels/:
- lora.FastLoraLinear and dropout.FastDropout: peft's LoRA layer and its input dropout;
- attention.ShortRowAttention: a shorter attention backward for short rows;
- loss.FusedCausalLMLoss: the vocabulary projection and cross-entropy without the logits (and
  loss.linear_log_probs: each token's log-probability the same way, for preference losses);
- weights.frozen_weights_in: frozen weights cast once to the compute dtype;
- allocator: freed memory kept between steps (and huge pages, set by the command line).

They are written against peft and transformers as pyproject.toml bounds them; `compat`
checks before each run that what they use is still there, and keeps them off, saying why in
one line, where it is not.

`for_training` applies them all for one training run and puts everything back after, so with
the switch off (or on a GPU) peft's own forward and transformers' own loss run; `applicable`
says which of them would apply to a model, from the same checks (docs/models.md). Nothing here
is imported by data/, config or ui/.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

SETTINGS = ("auto", "off")


def wanted(setting: str) -> bool:
    """Whether the kernels apply: 'auto' where training runs on the CPU; never with 'off'."""
    from ..hardware import cuda_available
    return setting == "auto" and not cuda_available()


@dataclass
class Applied:
    """What `for_training` switched on: a line for the training log, and the fused loss for
    the trainer (None where the model's head is not the plain one it replaces)."""
    parts: list = field(default_factory=list)
    fused_loss: object = None
    refused: str = ""  # why they are off though asked for: a library without what they use

    def describe(self) -> str:
        if self.refused:
            return self.refused
        return "CPU kernels: " + (", ".join(self.parts) if self.parts else "off (train.cpu_kernels)")


def applicable(model) -> dict[str, bool]:
    """Which kernels `for_training` would switch on for `model` (a peft model, trained on a
    CPU), asked of the checks the kernels themselves make: LoRA layer, dropout (none at
    lora_dropout 0), attention and fused loss."""
    import torch

    from . import attention, dropout, lora, loss
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    return {"LoRA layer": any(lora.switchable(m) for m in model.modules()),
            "dropout": any(dropout.replaceable(d) for d in dropouts),
            "attention": attention.applies_to(model), "fused loss": loss.replaces_loss_of(model)}


@contextmanager
def for_training(model, precision: str, enabled: bool):
    """Every kernel, for one training run of `model` (a peft model) in `precision`."""
    if not enabled:
        yield Applied()
        return
    from .compat import missing
    refused = missing(model)
    if refused:
        yield Applied(refused=refused)
        return
    import torch

    from . import allocator, attention, dropout, lora, loss, weights
    applied = Applied()
    with ExitStack() as stack:
        layers = stack.enter_context(lora.fast_lora_in(model))
        masks = stack.enter_context(dropout.fast_dropout_in(model))
        applied.parts.append(f"LoRA layers ({layers}), dropout ({masks})")
        stack.enter_context(weights.frozen_weights_in(model, precision))
        if stack.enter_context(attention.for_training(model)):
            applied.parts.append(f"attention for rows up to {attention.SHORT_ROWS} tokens")
        applied.fused_loss = loss.FusedCausalLMLoss.for_model(model, getattr(torch, precision))
        if applied.fused_loss is not None:
            applied.parts.append("fused loss")
        if stack.enter_context(allocator.freed_memory_kept()):
            applied.parts.append("freed memory kept")
        if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
            applied.parts.append("huge pages")
        yield applied


@contextmanager
def for_inference(enabled: bool):
    """What applies to evaluation: freed memory kept from batch to batch."""
    if not enabled:
        yield False
        return
    from .allocator import freed_memory_kept
    with freed_memory_kept() as kept:
        yield kept
