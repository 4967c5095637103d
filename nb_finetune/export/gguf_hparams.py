"""The hyperparameters each family's llama.cpp graph reads, as (GGUF key, value, where the value
lives in the transformers config): the writer stores the values, the round trip's GGUF reader
puts the file's values back into a config. Keys follow llama.cpp's convert_hf_to_gguf.py."""
from __future__ import annotations

from .gguf_layout import family, rope_parameters


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_path(config) -> str:
    rope = getattr(config, "rope_parameters", None) or {}
    return "rope_parameters.full_attention.rope_theta" if "full_attention" in rope else "rope_parameters.rope_theta"


def common(config) -> list[tuple[str, object, str | None]]:
    rot = rope_parameters(config).get("partial_rotary_factor", 1.0)
    return [
        ("{arch}.context_length", config.max_position_embeddings, "max_position_embeddings"),
        ("{arch}.embedding_length", config.hidden_size, "hidden_size"),
        ("{arch}.block_count", config.num_hidden_layers, "num_hidden_layers"),
        ("{arch}.feed_forward_length", config.intermediate_size, "intermediate_size"),
        ("{arch}.attention.head_count", config.num_attention_heads, "num_attention_heads"),
        ("{arch}.attention.head_count_kv", config.num_key_value_heads, "num_key_value_heads"),
        ("{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), "rms_norm_eps"),
        ("{arch}.attention.key_length", head_dim(config), None),
        ("{arch}.attention.value_length", head_dim(config), None),
        ("{arch}.rope.freq_base", float(rope_parameters(config).get("rope_theta", 10000.0)), rope_path(config)),
        ("{arch}.rope.dimension_count", int(rot * head_dim(config)), None),
        ("{arch}.vocab_size", config.vocab_size, "vocab_size"),
    ]


def gemma(config) -> list[tuple[str, object, str | None]]:
    out = []
    if getattr(config, "attn_logit_softcapping", None):
        out.append(("{arch}.attn_logit_softcapping", float(config.attn_logit_softcapping), "attn_logit_softcapping"))
    if getattr(config, "final_logit_softcapping", None):
        out.append(("{arch}.final_logit_softcapping", float(config.final_logit_softcapping),
                    "final_logit_softcapping"))
    if getattr(config, "sliding_window", None):
        out.append(("{arch}.attention.sliding_window", config.sliding_window, "sliding_window"))
        kinds = getattr(config, "layer_types", None) or []
        out.append(("{arch}.attention.sliding_window_pattern", [k == "sliding_attention" for k in kinds], None))
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local:
        out.append(("{arch}.rope.freq_base_swa", float(local.get("rope_theta", 10000.0)),
                    "rope_parameters.sliding_attention.rope_theta"))
    return out


def granite(config) -> list[tuple[str, object, str | None]]:
    """Granite's multipliers, under llama.cpp's names for them (scales)."""
    return [("{arch}.embedding_scale", float(config.embedding_multiplier), "embedding_multiplier"),
            ("{arch}.residual_scale", float(config.residual_multiplier), "residual_multiplier"),
            ("{arch}.attention.scale", float(config.attention_multiplier), "attention_multiplier"),
            ("{arch}.logit_scale", float(config.logits_scaling), "logits_scaling")]


def phi3(config) -> list[tuple[str, object, str | None]]:
    # 0 tells llama.cpp there is no sliding window (as its converter writes for Phi-4).
    return [("{arch}.attention.sliding_window", config.sliding_window or 0, None)]


EXTRA = {"gemma2": gemma, "gemma3_text": gemma, "granite": granite, "phi3": phi3}


def hyperparameters(config) -> list[tuple[str, object, str | None]]:
    """(key with the architecture filled in, value, config path or None) for `config`'s family."""
    arch = family(config).arch
    entries = common(config) + EXTRA.get(config.model_type, lambda c: [])(config)
    return [(key.format(arch=arch), value, path) for key, value, path in entries]


def add_hyperparameters(writer, config) -> None:
    import gguf
    for key, value, _ in hyperparameters(config):
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_key_value(key, int(value), gguf.GGUFValueType.UINT32)


def set_path(config, path: str, value) -> None:
    """Put a file's value back where the config keeps it (a dotted path into nested dicts)."""
    first, *rest = path.split(".")
    if not rest:
        setattr(config, first, value)
        return
    target = getattr(config, first)
    for key in rest[:-1]:
        target = target[key]
    target[rest[-1]] = value
