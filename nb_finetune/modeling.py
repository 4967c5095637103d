"""Models: resolve a name, load the tokenizer and the base (optionally 4/8-bit), add LoRA."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import assets, hardware
from .config import ModelConfig
from .errors import UserError

# Model types that are encoders: they get a classification head, never completion training.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                 "mpnet", "albert", "camembert", "modernbert"}
# Decoders whose modelling code in transformers 5 was read for what the CPU training paths
# replace: their attention calls the attention interface with only the standard arguments
# (attention.py), and their output is `logits = lm_head(hidden_states)` followed by
# transformers' own causal-LM loss, with no soft-capping or scaling in between (lm_loss.py).
# A type added here must satisfy both.
CHECKED_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gemma"}


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
    raise UserError(f"model {name!r} is not a built-in name ({', '.join(n for n, a in assets.BUILTIN.items() if a.kind == 'model')}), "
                        "a local folder, nor reachable on the Hugging Face Hub; check the name, or "
                        "download it and give its folder")


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
    # On CPU, float32 weights with bf16 autocast train faster than bf16 weights (measured:
    # 393 vs 276 tokens/s on SmolLM2-135M); on CUDA, half-precision weights save memory.
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
    registered"), and the adapters below learn from wrong gradients (measured: a QLoRA run
    that was validated before its first step reached a validation loss of 1.83 after 6
    steps, against 1.04 without). Unpacking again is lossy (the scales pass through bf16 and
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
    if cfg.quantization != "none":
        # Casts norms to fp32 and makes inputs require grad; checkpointing itself is the Trainer's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="SEQ_CLS" if objective == "head" else "CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # peft names the modules it could not find
        raise UserError(f"model.target_modules={cfg.target_modules!r}: {str(err).splitlines()[0]}") from None
    use_fast_dropout(model)
    use_fast_lora(model)
    return model


class _ScaledMask(torch.autograd.Function):
    """x where `keep`, times `scale`, else 0, cast to `dtype`; the same mask backward.

    For fp32 x the multiply is by an fp32 mask of 0 and scale, then the cast, so it rounds as
    x * scale (and autocast's cast after it) did. For bf16 or fp16 x (the input of a layer
    whose input another adapted layer made under autocast) the mask is 0 and 1 in that dtype,
    an exact multiply, then x * scale, which torch computes in fp32 and rounds once, as
    dropout on that dtype does. Only the boolean `keep` is saved for backward (an fp32 mask for
    the seven adapter inputs of every block would hold 0.9 GB more at batch 8 x 256 on
    SmolLM2). Every step has one dtype in and out: torch's CPU kernels that mix them (fp32 x
    written to a bf16 output, a bf16 gradient times an fp32 mask) were 3-10x slower than the
    same work as a same-dtype multiply and a cast."""

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
    transformer block. torch draws each mask element by element (`bernoulli_`, about 5 ns an
    element here), which made LoRA dropout 0.05 cost 40% of a training step on SmolLM2.
    Here 64-bit words from numpy's PCG64, seeded from torch's generator on every call (so
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


def use_fast_dropout(model) -> int:
    """Swap peft's adapter-input nn.Dropout modules for FastDropout; how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in dropouts.items():
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    dropouts[name] = FastDropout(layer.p)
                    swapped += 1
    return swapped


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


def _fast_lora_linear():
    from peft.tuners.lora.layer import Linear

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

        same_input = None  # a _SameInput, set by use_fast_lora

        def fast_path_for(self):
            """The adapter's name if this layer's call can take the fast path, else None."""
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

    # Found by pickle (torch.save of a whole model) as nb_finetune.modeling.FastLoraLinear.
    FastLoraLinear.__module__, FastLoraLinear.__qualname__ = __name__, "FastLoraLinear"
    return FastLoraLinear


def __getattr__(name: str):
    # The subclass needs peft, whose import takes seconds (it imports bitsandbytes): it is made
    # on first use, not when nb_finetune is imported.
    if name == "FastLoraLinear":
        globals()[name] = _fast_lora_linear()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_fast_lora(model) -> int:
    """Make peft's plain LoRA Linear layers FastLoraLinear (a subclass: isinstance checks,
    saving and merging are unchanged) and group those that read one input; how many layers
    were switched."""
    from peft.tuners.lora.layer import Linear
    fast = globals().get("FastLoraLinear") or __getattr__("FastLoraLinear")
    switched = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for child in children.values():
            if type(child) is Linear and type(child.base_layer) is torch.nn.Linear and not child.fan_in_fan_out:
                child.__class__ = fast
                switched += 1
        for names in SAME_INPUT:
            layers = [children[n] for n in names if isinstance(children.get(n), fast)]
            if len(layers) > 1:
                group = _SameInput(layers)
                for layer in layers:
                    layer.same_input = group
    return switched


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
