"""The model types the CPU kernels were checked against."""

# Decoders whose modelling code in transformers 5 was read for what the kernels replace: their
# attention calls the attention interface with only the standard arguments (attention.py), and
# their output is `logits = lm_head(hidden_states)` followed by transformers' own causal-LM
# loss, with no soft-capping or scaling in between (loss.py). A type added here must satisfy both.
CHECKED_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gemma"}
