"""How each transformers family is laid out in a GGUF file, after llama.cpp's convert_hf_to_gguf.py:
the GGUF architecture, tensor names (the `gguf` package's own name map), which families get Q/K
rows permuted to llama.cpp's rotary layout, Gemma's norm offset, where a tied output layer must
be written anyway, and the settings llama.cpp cannot run. One table both ways: the writer applies
it, the round trip's GGUF reader undoes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    arch: str  # the GGUF architecture (general.architecture)
    # HF keeps each head's rotary halves apart (rotate_half); llama.cpp's "normal" rope wants them
    # interleaved in pairs. Families llama.cpp runs with NEOX rope (Qwen, Phi-3, Gemma, OLMo2) stay
    # (OLMo2's Q/K norms span all heads, so they too stay as they are).
    permute_qk: bool = False
    # Gemma's RMSNorm scales by (1 + weight); llama.cpp multiplies by the stored weight.
    norm_shift: float = 0.0
    # llama.cpp's graph has no fallback to the embedding for a missing output layer (OLMo2), so a
    # tied one is written out as well.
    output_required: bool = False


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # a Llama to llama.cpp
    "granite": Family("granite", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "phi3": Family("phi3"),
    "olmo2": Family("olmo2", output_required=True),
    "smollm3": Family("smollm3", permute_qk=True),
    "gemma2": Family("gemma2", norm_shift=1.0),
    "gemma3_text": Family("gemma3", norm_shift=1.0),
}
# llama.cpp's SmolLM3 graph leaves rotary out of every 4th layer, whatever the file says.
SMOLLM3_NOPE_STEP = 4


def family(config) -> Family:
    """The family of a transformers config, or a one-line refusal naming what is supported."""
    fam = FAMILIES.get(config.model_type)
    if fam is None:
        raise UserError(f"GGUF export: not supported yet: {config.model_type} "
                        f"(supported: {', '.join(sorted(FAMILIES))})")
    for problem in (rope_problem(config), gemma_problem(config), smollm3_problem(config)):
        if problem:
            raise UserError(f"GGUF export: not supported yet: {problem} in {config.model_type}")
    return fam


def rope_parameters(config) -> dict:
    """The global layers' rope settings (Gemma 3 keeps one set per attention kind)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope)


def rope_problem(config) -> str:
    rope = getattr(config, "rope_parameters", None) or {}
    for params in (rope.get("full_attention", rope), rope.get("sliding_attention", {})):
        if params.get("rope_type", "default") != "default":
            return f"rope scaling {params['rope_type']!r}"
    return ""


def gemma_problem(config) -> str:
    """llama.cpp scales Gemma's attention by 1/sqrt(head_dim); HF by query_pre_attn_scalar."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if config.model_type.startswith("gemma") and scalar is not None and scalar != config.head_dim:
        return f"query_pre_attn_scalar {scalar} other than head_dim {config.head_dim}"
    return ""


def smollm3_problem(config) -> str:
    if config.model_type != "smollm3":
        return ""
    expected = [int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(config.num_hidden_layers)]
    if list(config.no_rope_layers) != expected:
        return f"no_rope_layers other than every {SMOLLM3_NOPE_STEP}th layer"
    return ""


def name_map(config):
    import gguf
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family(config).arch)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def tensor_name(hf_name: str, names) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight, by the gguf package's map."""
    gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise UserError(f"GGUF export: not supported yet: tensor {hf_name}")
    return gname


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF stores each head's rotary halves apart; llama.cpp wants them interleaved in pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(name: str, w: np.ndarray, config, fam: Family) -> np.ndarray:
    """One HF tensor in llama.cpp's layout."""
    if fam.permute_qk and name.endswith("q_proj.weight"):
        return rotary_permute(w, config.num_attention_heads)
    if fam.permute_qk and name.endswith("k_proj.weight"):
        return rotary_permute(w, config.num_key_value_heads)
    if fam.norm_shift and name.endswith("norm.weight"):
        return w + fam.norm_shift
    return w


def output_left_out(config) -> bool:
    """A tied output layer is left out where llama.cpp reuses the embedding for it."""
    return bool(getattr(config, "tie_word_embeddings", False)) and not family(config).output_required


def prepared_tensors(model, names=None):
    """(GGUF name, float32 array) for every tensor of `model`, in llama.cpp's layout."""
    cfg = model.config
    fam, names = family(cfg), names or name_map(cfg)
    leave_output = output_left_out(cfg)
    for name, tensor in model.state_dict().items():
        if leave_output and name == "lm_head.weight":
            continue
        w = tensor.detach().float().cpu().numpy()
        yield tensor_name(name, names), to_gguf(name, w, cfg, fam)
