"""The trained adapter, alone or merged into its base as a standalone model."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import RunConfig


def save_adapter(model, tokenizer, folder: str | Path) -> Path:
    """The trained LoRA adapter (a few MB) and the tokenizer, loadable with peft's
    `AutoPeftModelForCausalLM.from_pretrained(folder)` on top of the same base."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def merge(cfg: RunConfig, adapter_dir: str | Path, objective: str = "completion",
          labels: list[str] | None = None, progress=print):
    """(merged model, tokenizer): the base loaded again unquantized (a 4-bit base cannot take
    merged weights exactly) with the adapter added into its weights."""
    from ..modeling import adapter_base, load_adapter, load_base, load_tokenizer
    if cfg.model.quantization != "none":
        progress(f"the base was trained {cfg.model.quantization} (QLoRA): merging into a dequantized "
                 "full-precision copy of it")
    progress(f"merging the adapter from {adapter_dir} into {cfg.model.name}")
    trained_on = adapter_base(adapter_dir)
    if trained_on and Path(trained_on).name != Path(cfg.model.name).name:
        # Same shapes load silently, so a different name is said even when the merge works.
        progress(f"note: the adapter says it was trained on {trained_on}, not {cfg.model.name}")
    model_cfg = replace(cfg.model, quantization="none")
    tokenizer = load_tokenizer(model_cfg, progress)
    base = load_base(model_cfg, objective, labels, tokenizer.pad_token_id, progress)
    return load_adapter(base, adapter_dir, cfg.model.name).merge_and_unload(), tokenizer


def save_merged(cfg: RunConfig, adapter_dir: str | Path, folder: str | Path, objective: str,
                labels: list[str] | None = None, progress=print) -> Path:
    """A standalone model (base + adapter) saved as safetensors."""
    folder = Path(folder)
    merged, tokenizer = merge(cfg, adapter_dir, objective, labels, progress)
    merged.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def adapter_mismatch(adapter_dir: str | Path, model) -> str:
    """The first LoRA weight in the adapter whose shape does not fit a layer of `model`, or ''.
    Only shapes are read, so a model on the meta device will do: an adapter from another base is
    refused before any weights are loaded."""
    from safetensors import safe_open
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return ""  # a .bin adapter: the merge itself reports a mismatch
    layers = dict(model.named_modules())
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            for part, axis in ((".lora_A.", 1), (".lora_B.", 0)):
                if part not in key:
                    continue
                name = key.split(part)[0].removeprefix("base_model.model.")
                layer = layers.get(name)
                if layer is None or not hasattr(layer, "weight"):
                    return f"{name} is not a layer of the base"
                size, expected = f.get_slice(key).get_shape()[axis], layer.weight.shape[axis]
                if size != expected:
                    return f"{name} is {expected} wide in the base, {size} in the adapter"
    return ""
