"""The GGUF export's round trip through llama.cpp itself (llama-cpp-python, the optional
`llama-cpp` extra): its tokenizer gives the chat-templated prompt the same ids, its logits stay
within the same bounds as transformers', greedy f16 answers match the merged model's, and it stops at
end-of-turn. Skipped when llama_cpp is not installed; without it the export checks through
transformers alone."""
import pytest
from test_gguf import config_for, make_adapter

from nb_finetune.export import export_gguf, roundtrip

pytestmark = pytest.mark.llama_cpp


def test_without_llama_cpp_only_transformers_reads(monkeypatch):
    monkeypatch.setattr(roundtrip, "llama_cpp_available", lambda: False)
    assert roundtrip.readers("llama") == ["transformers"]
    assert roundtrip.readers("olmo2") == ["gguf-reader"]


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
