"""Write a transformers causal LM as one GGUF file (llama.cpp, Ollama, LM Studio), in pure Python
with the `gguf` package: llama.cpp's own writer, so no llama.cpp build and no download.

Follows llama.cpp's convert_hf_to_gguf.py for the Llama family: the same tensor names, Q and K
rows permuted to the rotary layout llama.cpp uses, 1-D tensors (norms, biases) kept in F32, and
the tokenizer (gpt2 BPE: tokens, types, merges, special ids) with the chat template inside.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

# Hugging Face model_type -> GGUF architecture. Mistral is a Llama to llama.cpp.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QUANT_TYPES = ("f16", "q8_0", "q4_0")
_LAYER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def check_quant(quant: str) -> str:
    if quant not in QUANT_TYPES:
        raise UserError(f"unknown GGUF quant type {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    return quant


def architecture(config) -> str:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export: not supported yet: {config.model_type} "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: not supported yet: rope scaling {rope['rope_type']!r} in {config.model_type}")
    return arch


def tensor_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    if part not in _LAYER_PARTS:
        raise UserError(f"GGUF export: not supported yet: tensor {hf_name}")
    return f"blk.{index}.{_LAYER_PARTS[part]}.{kind}"


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF stores each head's rotary halves apart; llama.cpp wants them interleaved in pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def prepared_tensors(model, arch: str):
    """(GGUF name, float32 array) for every tensor, Q and K permuted for llama."""
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        w = tensor.detach().float().cpu().numpy()
        if arch == "llama" and ".q_proj." in name:
            w = rotary_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = rotary_permute(w, cfg.num_key_value_heads)
        yield tensor_name(name), w


def storage_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor is stored in: 1-D in F32; for q4_0 the embedding (also the output
    when tied) in Q8_0, as llama-quantize keeps it above 4 bits; rows not a whole number of
    32-value blocks fall back to F16."""
    from gguf import GGMLQuantizationType as Q
    if len(shape) == 1:
        return Q.F32
    if quant == "f16" or shape[-1] % 32:
        return Q.F16
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return Q.Q8_0 if quant == "q8_0" else Q.Q4_0


def encode(w: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return quants.quantize(w, qtype)


def estimated_bytes(model, quant: str) -> int:
    """The file's size before writing it: bits per weight of each storage type (Q8_0 stores 32
    values in 34 bytes, Q4_0 in 18)."""
    per_value = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
    total = 0.0
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        total += tensor.numel() * per_value[storage_type(tensor_name(name), tuple(tensor.shape), quant).name]
    return int(total) + 8 * 2**20  # tokenizer and metadata


def add_hyperparameters(writer, config, arch: str, name: str, quant: str) -> None:
    import gguf
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[quant])


def pre_tokenizer(config, tokenizer) -> str:
    """llama.cpp's name for the regex that splits text before BPE (it refuses names it does not know)."""
    if config.model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in tokenizer.get_vocab():
        return "llama-bpe"
    if "<|im_start|>" in tokenizer.get_vocab() and len(tokenizer) == 49152:
        return "smollm"
    return "default"


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp's types (normal, control for special added tokens,
    user-defined for other added ones), padded to the model's vocabulary size."""
    from gguf import TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    return tokens, types


def add_tokenizer(writer, config, tokenizer, model_dir: Path) -> None:
    """Tokens, merges, special ids and the chat template; the stop token must survive, or the
    exported model never stops talking."""
    import gguf
    if not getattr(tokenizer, "is_fast", False) or tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise UserError("GGUF export: not supported yet: a tokenizer that is not byte-level BPE")
    tokens, types = token_table(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(config, tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.eos_token_id is None or not tokenizer.chat_template:
        raise UserError("GGUF export: the tokenizer has no end-of-sequence token or no chat template; "
                        "save the base's tokenizer with the adapter")


def write_gguf(model, tokenizer, model_dir: Path, path: Path, quant: str, name: str) -> Path:
    """The model (merged, unquantized) and its tokenizer as one GGUF file at `path`."""
    import gguf
    arch = architecture(model.config)
    writer = gguf.GGUFWriter(str(path), arch)
    add_hyperparameters(writer, model.config, arch, name, quant)
    add_tokenizer(writer, model.config, tokenizer, model_dir)
    for gname, w in prepared_tensors(model, arch):
        qtype = storage_type(gname, w.shape, quant)
        writer.add_tensor(gname, encode(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
