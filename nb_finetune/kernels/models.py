"""The model types the CPU kernels were checked against."""

# Decoders whose modelling code in transformers 5 was read for what the kernels replace: their
# attention calls the attention interface with only the standard arguments (attention.py), and
# their output is `logits = lm_head(hidden_states)` followed by transformers' own causal-LM
# loss (loss.py). A type added here must satisfy both, except for the soft-capping below.
# Gemma 2 and 3 scale their input embeddings (the tied lm_head weight is not scaled, so the
# projection is still the plain one) and scale queries by query_pre_attn_scalar (passed to the
# attention as `scaling`); sliding-window layers get their window through the mask.
CHECKED_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gemma", "gemma2",
                    "gemma3_text"}


def plain_head(config) -> bool:
    """Whether the model's logits reach the loss unchanged: a checked type without the final
    tanh soft-capping that Gemma 2 configs set (Gemma 3's default leaves it off)."""
    return (getattr(config, "model_type", None) in CHECKED_DECODERS
            and getattr(config, "final_logit_softcapping", None) is None)


def plain_attention(config) -> bool:
    """Whether the model's attention is the standard one: a checked type without soft-capped
    attention scores (Gemma 2's default)."""
    return (getattr(config, "model_type", None) in CHECKED_DECODERS
            and getattr(config, "attn_logit_softcapping", None) is None)
