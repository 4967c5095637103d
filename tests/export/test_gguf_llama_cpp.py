"""The GGUF export's round trip through llama.cpp itself (llama-cpp-python, the optional
`llama-cpp` extra): its tokenizer gives the chat-templated prompt the same ids, its logits stay
within the same bounds as transformers', greedy f16 answers match the merged model's, and it stops at
end-of-turn. Skipped when llama_cpp is not installed; without it the export checks through
transformers alone."""
import pytest
import test_gguf_families
from test_gguf import config_for, make_adapter
from test_gguf_families import ADAPTER_B_SCALE, FAMILIES, tiny_family

from nb_finetune.export import export_gguf, roundtrip

pytestmark = pytest.mark.llama_cpp
gemma_tokenizer = test_gguf_families.gemma_tokenizer  # a fixture


def test_without_llama_cpp_only_transformers_reads(monkeypatch):
    monkeypatch.setattr(roundtrip, "llama_cpp_available", lambda: False)
    assert roundtrip.readers("llama") == ["transformers"]
    assert roundtrip.readers("granite") == ["gguf-reader"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_round_trip_through_llama_cpp(quant, smollm2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter")
    result = export_gguf(config_for(smollm2_dir), adapter, tmp_path / "out", quant, progress=lambda m: None)
    [check] = result.roundtrip.others
    print(check.summary())
    assert check.reader == "llama.cpp" and check.ok and check.max_logit_diff <= roundtrip.BOUNDS[quant]
    assert check.top1_same == check.clear > 0
    assert check.stops and all(check.stops)
    assert "read back by llama.cpp" in result.roundtrip.summary()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_through_llama_cpp(model_type, tokenizer, tmp_path):
    """llama.cpp runs each family's file like transformers runs the merged model."""
    pytest.importorskip("llama_cpp")
    base = tiny_family(model_type, tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", targets="all-linear", b_scale=ADAPTER_B_SCALE)
    result = export_gguf(config_for(base), adapter, tmp_path / "out", "f16", progress=lambda m: None)
    [check] = result.roundtrip.others
    print(model_type, result.roundtrip.summary())
    assert check.reader == "llama.cpp" and check.ok and check.top1_same == check.clear > 0


@pytest.mark.slow
def test_sentencepiece_vocabulary_through_llama_cpp(gemma_tokenizer, tmp_path):
    """Gemma's tokenizer written as a "llama" vocabulary: llama.cpp's SentencePiece tokenizer,
    merging by the written scores, gives the prompts the ids transformers gives them."""
    pytest.importorskip("llama_cpp")
    base = tiny_family("gemma3_text", gemma_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", targets="all-linear")
    result = export_gguf(config_for(base), adapter, tmp_path / "out", "f16", progress=lambda m: None)
    [check] = result.roundtrip.others
    print(check.summary())
    assert check.reader == "llama.cpp" and check.ok
