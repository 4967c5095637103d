"""The generation-time word filter on the real SmolLM2: it stops the model writing a blocked
word, and counts what it blocked."""
from __future__ import annotations

from nb_finetune.probes.filter import WordFilter


def test_word_filter_blocks_and_counts_on_a_real_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok("The capital of France is the city of", return_tensors="pt")
    free = tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in free  # what the filter has to stop
    word_filter = WordFilter(tok, ["Paris"])
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([word_filter]))
    filtered = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" not in filtered and word_filter.blocked["Paris"] >= 1
