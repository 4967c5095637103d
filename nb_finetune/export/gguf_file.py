"""Write a transformers causal LM as one GGUF file (llama.cpp, Ollama, LM Studio), in pure Python
with the `gguf` package: llama.cpp's own writer, so no llama.cpp build and no download.

Follows llama.cpp's convert_hf_to_gguf.py family by family (gguf_layout: names and layouts;
gguf_hparams: hyperparameters; gguf_vocab: the tokenizer, chat template inside), with 1-D
tensors (norms, biases) kept in F32 and the matrices in the chosen type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from . import gguf_layout, gguf_vocab
from .gguf_hparams import add_hyperparameters
from .gguf_layout import family, name_map

QUANT_TYPES = ("f16", "q8_0", "q4_0")


def check_quant(quant: str) -> str:
    if quant not in QUANT_TYPES:
        raise UserError(f"unknown GGUF quant type {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    return quant


def architecture(config) -> str:
    """The GGUF architecture of a transformers config; a family (or setting) llama.cpp cannot run
    from our file is refused in one line that names the supported ones."""
    return family(config).arch


def tensor_name(hf_name: str, config) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    return gguf_layout.tensor_name(hf_name, name_map(config))


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
    leave_output = gguf_layout.output_left_out(model.config)
    names = name_map(model.config)
    for name, tensor in model.state_dict().items():
        if leave_output and name == "lm_head.weight":
            continue
        gname = gguf_layout.tensor_name(name, names)
        total += tensor.numel() * per_value[storage_type(gname, tuple(tensor.shape), quant).name]
    return int(total) + 8 * 2**20  # tokenizer and metadata


def add_general(writer, name: str, quant: str) -> None:
    import gguf
    writer.add_name(name)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[quant])


def write_gguf(model, tokenizer, model_dir: Path, path: Path, quant: str, name: str,
               chat_template: bool | None = None) -> Path:
    """The model (merged, unquantized) and its tokenizer as one GGUF file at `path`; the chat
    template goes in where the tokenizer has one (`chat_template`: see gguf_vocab.add_tokenizer)."""
    import gguf
    writer = gguf.GGUFWriter(str(path), architecture(model.config))
    add_general(writer, name, quant)
    add_hyperparameters(writer, model.config)
    gguf_vocab.add_tokenizer(writer, model.config, tokenizer, model_dir, chat_template)
    for gname, w in gguf_layout.prepared_tensors(model):
        qtype = storage_type(gname, w.shape, quant)
        writer.add_tensor(gname, encode(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
