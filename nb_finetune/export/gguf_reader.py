"""A GGUF reader for the round trip where transformers' GGUF loader does not know the family
(Granite, OLMo2, SmolLM3): gguf.GGUFReader reads the file, each tensor is dequantized and put
back into a fresh transformers model of the family through the inverse of the writer's layout,
and the file's hyperparameters replace the config's. It shares the layout table with the writer,
so llama.cpp (when installed) is the independent check of those families' layouts; this reader
still catches lost tensors, wrong shapes, wrong hyperparameters and a wrong vocabulary."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .gguf_hparams import hyperparameters, set_path
from .gguf_layout import family, name_map, tensor_name


def rotary_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's pairs-interleaved rotary rows back to HF's halves (written independently of
    the writer's permutation, so a writer that forgets it is caught)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf(name: str, w: np.ndarray, config, fam) -> np.ndarray:
    if fam.permute_qk and name.endswith("q_proj.weight"):
        return rotary_unpermute(w, config.num_attention_heads)
    if fam.permute_qk and name.endswith("k_proj.weight"):
        return rotary_unpermute(w, config.num_key_value_heads)
    if fam.norm_shift and name.endswith("norm.weight"):
        return w - fam.norm_shift
    return w


def file_config(reader, config_dir: str):
    """The family's config with every hyperparameter the file holds taken from the file."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(config_dir)
    for key, _, path in hyperparameters(config):
        if path and key in reader.fields:
            set_path(config, path, reader.fields[key].contents())
    return config


def load_model(gguf_path: str, config_dir: str):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM
    reader = gguf.GGUFReader(gguf_path)
    config = file_config(reader, config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fam, names = family(config), name_map(config)
    hf_names = {tensor_name(n, names): n for n in model.state_dict()}
    state = {}
    for t in reader.tensors:
        hf = hf_names.get(t.name)
        if hf is None:
            raise UserError(f"GGUF reader: a tensor the family does not have: {t.name}")
        w = gguf.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        state[hf] = torch.from_numpy(np.ascontiguousarray(from_gguf(hf, w, config, fam), dtype=np.float32))
    missing = set(model.state_dict()) - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise UserError(f"GGUF reader: tensors missing from the file: {', '.join(sorted(missing))}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def load_tokenizer(gguf_path: str):
    """The tokenizer as transformers builds it from the file's vocabulary (its builders do not
    depend on the architecture being one its model loader knows)."""
    import os

    from transformers import PreTrainedTokenizerFast
    folder, name = os.path.split(gguf_path)
    return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
