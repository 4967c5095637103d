"""Models: resolve a name, load the tokenizer and the base (optionally 4/8-bit), add LoRA."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import assets, hardware
from .config import ModelConfig
from .errors import UserError

# Model types that are encoders: they get a classification head, never completion training.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                 "mpnet", "albert", "camembert", "modernbert"}
def resolve(name: str, progress=print) -> str:
    """A local folder for a built-in name or a path; a Hub id is passed through as it is."""
    if name in assets.BUILTIN:
        return str(assets.model_path(name, progress))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; give a folder saved with save_pretrained")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder not found: {path}")
    return name


def _load(loader, name: str, **kwargs):
    try:
        return _load_any(loader, name, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(f"{name} ships its own Python code, which is not run by default; set "
                            "model.trust_remote_code: true only if you trust its source") from None
        raise


def _load_any(loader, name: str, **kwargs):
    if os.path.isdir(name):
        try:
            return loader(name, **kwargs)
        except OSError as err:
            raise UserError(f"cannot load the model in {name}: {str(err).splitlines()[0]}") from None
    try:  # a Hub id: the local Hugging Face cache first, then the Hub if it answers
        return loader(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    try:
        if hardware.hub_reachable():
            return loader(name, **kwargs)
    except OSError:
        pass
    builtin = ", ".join(n for n, a in assets.BUILTIN.items() if a.kind == "model")
    raise UserError(f"model {name!r} is not a built-in name ({builtin}), a local folder, nor reachable on the "
                    "Hugging Face Hub; check the name, or download it and give its folder")


def load_tokenizer(cfg: ModelConfig, progress=print):
    from transformers import AutoTokenizer
    tok = _load(AutoTokenizer.from_pretrained, resolve(cfg.name, progress),
                trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Padding is masked by position (attention mask, label -100), so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_config(cfg: ModelConfig, progress=print):
    from transformers import AutoConfig
    return _load(AutoConfig.from_pretrained, resolve(cfg.name, progress), trust_remote_code=cfg.trust_remote_code)


def objective_for(cfg: ModelConfig, model_config) -> str:
    encoder = model_config.model_type in ENCODER_TYPES
    if cfg.objective == "auto":
        return "head" if encoder else "completion"
    if cfg.objective == "completion" and encoder:
        raise UserError(f"model.objective='completion' needs a decoder; {cfg.name} is an encoder "
                        f"({model_config.model_type}): use objective 'head'")
    return cfg.objective


def _refuse_pickle_only(name: str) -> None:
    folder = Path(name)
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickles:
            raise UserError(f"{name} has only pickle weights ({', '.join(pickles)}), which can run code when "
                            "loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
                            "their source")


def quantization_config(cfg: ModelConfig):
    if cfg.quantization == "none":
        return None
    ok, why = hardware.bitsandbytes_available()
    if not ok:
        raise UserError(f"model.quantization={cfg.quantization!r} needs bitsandbytes: {why}; or set it to 'none'")
    from transformers import BitsAndBytesConfig
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, hardware.compute_dtype(cfg.compute_dtype)))


def load_base(cfg: ModelConfig, objective: str, labels: list[str] | None = None, pad_token_id=None,
              progress=print):
    """The frozen base model, before adapters."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    quant = quantization_config(cfg)
    # On a CPU, bf16 autocast over float32 weights (bf16 weights train slower there);
    # on CUDA, half-precision weights save memory.
    dtype = torch.float32 if not hardware.cuda_available() else getattr(torch, hardware.compute_dtype(cfg.compute_dtype))
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    local_gpu = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per process under a launcher
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": local_gpu if hardware.cuda_available() else "cpu"}
    name = resolve(cfg.name, progress)
    if not cfg.allow_pickle:
        _refuse_pickle_only(name)
        kwargs["use_safetensors"] = True
    if objective == "head":
        labels = labels or []
        model = _load(AutoModelForSequenceClassification.from_pretrained, name, num_labels=len(labels),
                      id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
                      **kwargs)
        if model.config.pad_token_id is None and pad_token_id is not None:
            model.config.pad_token_id = pad_token_id  # decoders classify from the last non-pad token
    else:
        model = _load(AutoModelForCausalLM.from_pretrained, name, **kwargs)
    if quant is None and hardware.cuda_available():
        model.to(f"cuda:{local_gpu}")
    keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; how many
    layers it applied to.

    bitsandbytes (0.49, 0.50) repacks a Linear4bit weight for an AVX512-BF16 inference kernel
    the first time the layer runs on a CPU in eval mode without gradients (validation, a
    sample, the base model's scores) and keeps that layout. Training passes after that go
    through the inference kernel, which has no backward: no gradient flows through the
    frozen layers, bitsandbytes only warns ("gemv_4bit: an autograd kernel was not
    registered"), and the adapters below learn from wrong gradients (a QLoRA run validated
    before its first step learned far less). Unpacking again is lossy (the scales pass through bf16 and
    are quantized again), so a model that may train is never packed; evaluation then takes
    the same path as training."""
    layers = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            layers += 1
    return layers


def add_lora(model, cfg: ModelConfig, objective: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from .kernels import lora as lora_kernel
    if cfg.quantization != "none":
        # Casts norms to fp32 and makes inputs require grad; checkpointing itself is the Trainer's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="SEQ_CLS" if objective == "head" else "CAUSAL_LM")
    # The CPU kernels' LoRA layer, through peft's own dispatch: peft's forward until a training
    # run with train.cpu_kernels on switches its fast path on.
    lora_kernel.dispatch_fast_lora(lora)
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # peft names the modules it could not find
        raise UserError(lora_refused(cfg, str(err).splitlines()[0])) from None
    return model


def lora_refused(cfg: ModelConfig, why: str) -> str:
    """The one line for a LoRA config peft refuses, with the setting that fixes it."""
    if "ParamWrapper" in why and "lora_dropout" in why:
        # peft adapts the fused expert weights of mixture-of-experts models (qwen3_moe, mixtral,
        # olmoe) as parameters, and those adapters have no dropout.
        return (f"model.lora_dropout={cfg.lora_dropout}: this mixture-of-experts model's experts are adapted as "
                "weights, which take no dropout; set model.lora_dropout: 0")
    return f"model.target_modules={cfg.target_modules!r}: {why}"


def load_adapter(base, adapter_dir, base_name: str):
    """`base` with a saved LoRA adapter on it; an adapter trained on another base is a one-line error."""
    from peft import PeftModel
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"no adapter in {adapter_dir}: train first, or give the folder a run saved its adapter in")
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise another_base(adapter_dir, base_name) from err


def adapter_base(adapter_dir: str | Path) -> str:
    """The base named in the adapter's adapter_config.json ('' when it names none)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return ""
    return json.loads(path.read_text()).get("base_model_name_or_path") or ""


def another_base(adapter_dir: str | Path, base_name: str, detail: str = "") -> UserError:
    named = adapter_base(adapter_dir)
    why = "; ".join(filter(None, [f"it names {named}" if named else "", detail]))
    return UserError(f"the adapter in {adapter_dir} was trained on another base than {base_name}"
                     + (f" ({why})" if why else "") + ": set model.name to the base it was trained on")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def keeps_logits_selectively(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
