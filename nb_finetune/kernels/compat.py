"""Whether the installed peft and transformers still have what the CPU kernels build on.

The kernels stand in for parts of peft's LoRA layer and transformers' attention and loss, and
reach for some of their inner names. A release that renames or drops one of those would break
training, or worse, change it silently; the kernels then stay off for the run, said in one
line that names the library, its version and what it lacks."""
from __future__ import annotations

import importlib
from importlib import metadata

# (module, names it must have): what the kernels import or call.
MODULES = (
    ("peft.tuners.lora.layer", ("Linear",)),
    ("peft.helpers", ("disable_input_dtype_casting",)),
    ("transformers.modeling_utils", ("ALL_ATTENTION_FUNCTIONS",)),
    ("transformers.masking_utils", ("ALL_MASK_ATTENTION_FUNCTIONS", "sdpa_mask")),
    ("transformers.integrations.sdpa_attention", ("sdpa_attention_forward",)),
    ("transformers.utils.generic", ("GeneralInterface",)),
)
# The class mapping that register() writes and the short-row attention takes its name out of.
CLASS_MAPPINGS = (("transformers.utils.generic", "GeneralInterface", "_global_mapping"),)
# peft's custom-module dispatch, through which peft builds the kernels' LoRA layer (lora.dispatch_fast_lora).
CLASS_METHODS = (("peft.tuners.lora.config", "LoraConfig", "_register_custom_module"),)
# What FastLoraLinear reads from each of peft's LoRA Linear layers, and how.
LAYER_METHODS = ("_cast_input_dtype", "forward")
LAYER_MAPPINGS = ("lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "lora_bias")
LAYER_VALUES = ("base_layer", "fan_in_fan_out", "active_adapters", "disable_adapters", "merged")
# What the fused loss reads from the causal LM.
MODEL_NAMES = ("get_output_embeddings", "get_decoder")


def version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def lacking(library: str, what: str) -> str:
    return f"CPU kernels off: {library} {version(library)} {what}; training runs {library}'s own code"


def missing_name() -> str | None:
    """The first module or name the kernels import that is gone, as one line; None if all are there."""
    for module_name, names in MODULES:
        library = module_name.split(".")[0]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return lacking(library, f"has no module {module_name}")
        for name in names:
            if not hasattr(module, name):
                return lacking(library, f"has no {module_name}.{name}")
    for module_name, owner, name in CLASS_MAPPINGS:
        if not isinstance(getattr(getattr(importlib.import_module(module_name), owner), name, None), dict):
            return lacking(module_name.split(".")[0], f"has no mapping {owner}.{name}")
    for module_name, owner, name in CLASS_METHODS:
        if not callable(getattr(getattr(importlib.import_module(module_name), owner), name, None)):
            return lacking(module_name.split(".")[0], f"has no method {owner}.{name}")
    return None


def missing_in_model(model) -> str | None:
    """What the kernels read from this model's LoRA layers and causal LM that is not there."""
    from peft.tuners.lora.layer import Linear
    layer = next((m for m in model.modules() if isinstance(m, Linear)), None)
    if layer is not None:
        for name in LAYER_METHODS:
            if not callable(getattr(type(layer), name, None)):
                return lacking("peft", f"has no method LoRA Linear.{name}")
        for name in LAYER_MAPPINGS:
            if not all(hasattr(getattr(layer, name, None), need) for need in ("__contains__", "__getitem__")):
                return lacking("peft", f"has no mapping LoRA Linear.{name}")
        for name in LAYER_VALUES:
            if not hasattr(layer, name):
                return lacking("peft", f"has no attribute LoRA Linear.{name}")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in MODEL_NAMES:
        if not hasattr(lm, name):
            return lacking("transformers", f"has no {type(lm).__name__}.{name}")
    return None


def missing(model) -> str | None:
    """One line naming the library, its version and what the kernels lack in it; None when
    everything they use is there."""
    return missing_name() or missing_in_model(model)
