"""GGUF for every family llama.cpp runs: tiny random models of each family (2 layers, 64 wide,
SmolLM2's byte-level BPE tokenizer; Gemma's SentencePiece tokenizer where the cache has it) are
exported and read back; refusals come before the merge in one line; a broken file (wrong Q/K
layout, a lost tensor, a wrong vocabulary) fails its round trip with the failure named; a base
model without a chat template exports plain; the run folder is left as it was."""
import hashlib
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_ENV
from test_gguf import config_for, leftovers, make_adapter, never_merged

from nb_finetune import UserError
from nb_finetune.export import export_gguf, gguf_export, gguf_file, gguf_layout, gguf_reader, gguf_vocab, roundtrip

# Settings that make each family's tiny model one every reader computes like transformers: Gemma's
# attention scale is 1/sqrt(head_dim) in llama.cpp, and transformers' GGUF loader assumes a
# query_pre_attn_scalar of 256 (the real Gemmas' head size) and for Qwen3 the head size 128 (it
# does not read the file's); SmolLM3 gets 4 layers so one goes
# without rotary, as llama.cpp leaves it out of every 4th; Granite's multipliers away from 1 so a
# lost one shows.
SETTINGS = {"gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256},
            "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256},
            "qwen3": {"head_dim": 128}, "smollm3": {"num_hidden_layers": 4},
            "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 1 / 16,
                        "logits_scaling": 8.0}}
FAMILIES = sorted(gguf_layout.FAMILIES)
# peft's random B (init_lora_weights=False) is as large as A, which makes an all-linear adapter's
# change about 4 times the tiny model's own weights: the model is then so sensitive that rounding
# its weights to f16 alone moves OLMo2's logits past the 1% bound (in transformers, on the file's
# own weights). A quarter of it changes the model about as much as its weights are large.
ADAPTER_B_SCALE = 0.25
GEMMA_TOKENIZER = Path.home() / ".cache" / "nb_finetune" / "models" / "gemma3-270m"


def tiny_config(model_type, tokenizer, **overrides):
    from transformers import AutoConfig
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id)
    return AutoConfig.for_model(model_type, **(kw | SETTINGS.get(model_type, {}) | overrides))


def tiny_family(model_type, tokenizer, folder, **overrides):
    """A random model of the family, saved with the tokenizer; norms moved away from their
    initial value so a lost norm offset shows."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


def files_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tensor_has_a_gguf_name_and_the_layout_inverts(model_type, tokenizer):
    from transformers import AutoModelForCausalLM
    config = tiny_config(model_type, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in gguf_layout.prepared_tensors(model)]
    assert len(names) == len(set(names)) and "token_embd.weight" in names
    # A tied output layer is left out, but llama.cpp's OLMo2 graph has no fallback to the embedding.
    assert ("output.weight" in names) == (model_type == "olmo2")
    fam = gguf_layout.family(config)
    for name, tensor in model.state_dict().items():
        w = torch.randn(tensor.shape).numpy()
        assert np.allclose(gguf_reader.from_gguf(name, gguf_layout.to_gguf(name, w, config, fam), config, fam), w,
                           atol=1e-6)
    if model_type == "phi3":  # fused QKV and gate_up stay fused, as llama.cpp's phi3 graph splits them
        assert "blk.0.attn_qkv.weight" in names and "blk.0.ffn_up.weight" in names
    if model_type in ("qwen3", "gemma3_text"):
        assert "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names


@pytest.mark.parametrize("model_type, overrides, says", [
    ("gemma3_text", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32 other than head_dim 256 in gemma3_text"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope scaling 'linear' in llama"),
    ("smollm3", {"no_rope_layers": [1, 1, 1, 1]}, "no_rope_layers other than every 4th layer in smollm3"),
])
def test_settings_llama_cpp_cannot_run_are_refused(model_type, overrides, says, tokenizer):
    with pytest.raises(UserError, match=f"^GGUF export: not supported yet: {says}$"):
        gguf_file.architecture(tiny_config(model_type, tokenizer, **overrides))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_round_trip(model_type, tokenizer, tmp_path):
    base = tiny_family(model_type, tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", targets="all-linear", b_scale=ADAPTER_B_SCALE)
    result = export_gguf(config_for(base), adapter, tmp_path / "out", "f16", progress=lambda m: None)
    check = result.roundtrip
    print(model_type, check.summary())
    arch = gguf_layout.FAMILIES[model_type].arch
    assert check.ok and check.reader == roundtrip.readers(arch)[0]
    assert check.top1_same == check.clear > 0 and check.max_logit_diff <= roundtrip.BOUNDS["f16"]
    fields = gguf.GGUFReader(result.gguf).fields
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    if model_type == "granite":
        assert fields["granite.logit_scale"].contents() == 8.0
        assert fields["granite.embedding_scale"].contents() == 12.0


@pytest.mark.slow  # a whole export, read back in a fresh process
def test_a_lost_tensor_fails_and_is_named(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    real = gguf_layout.prepared_tensors
    monkeypatch.setattr(gguf_layout, "prepared_tensors",
                        lambda model, names=None: ((n, w) for n, w in real(model, names) if n != "blk.1.ffn_down.weight"))
    with pytest.raises(UserError, match=r"FAILED: tensors missing from the file: model\.layers\.1\.mlp\.down_proj"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a whole export, read back in a fresh process
def test_a_wrong_vocabulary_fails_and_is_named(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    """Two tokens every prompt uses trade places in the file's vocabulary."""
    real = gguf_vocab.token_table

    def swapped(tokenizer, vocab_size, kind="gpt2"):
        tokens, types = real(tokenizer, vocab_size, kind)
        a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("user", "assistant"))
        tokens[a], tokens[b] = tokens[b], tokens[a]
        return tokens, types
    monkeypatch.setattr(gguf_vocab, "token_table", swapped)
    with pytest.raises(UserError, match=r"FAILED: prompt 1 tokenizes differently \(wrong vocabulary"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def base_without_template(tiny_model_dir, tmp_path_factory):
    """The tiny llama as a base model: its tokenizer has no chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(folder)
    return folder


def test_chat_template_asked_of_a_base_model_is_refused_before_loading(base_without_template, tiny_adapter,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "merge", never_merged)
    with pytest.raises(UserError, match=r"^GGUF export: a chat template was asked for, but the tokenizer has none"):
        export_gguf(config_for(base_without_template), tiny_adapter, tmp_path / "out", "f16", chat_template=True)
    assert list(tmp_path.iterdir()) == []
    config_for(base_without_template).save(tmp_path / "config.yaml")
    bad = subprocess.run([sys.executable, "-m", "nb_finetune", "export", "--config", str(tmp_path / "config.yaml"),
                          "--adapter", str(tiny_adapter), "--out", str(tmp_path / "out"), "--gguf", "f16",
                          "--chat-template", "yes"], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "chat template was asked" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.slow  # a whole export, read back in a fresh process
def test_base_model_exports_plain_and_the_run_folder_is_unchanged(base_without_template, tmp_path):
    """No template in the file, a plain Modelfile, the round trip on the plain prompts; the run
    folder (adapter and all) hashes the same before and after."""
    run = tmp_path / "run"
    adapter = make_adapter(base_without_template, run / "adapter")
    (run / "history.csv").write_text("step,loss\n1,2.0\n")
    before = files_hash(run)
    result = export_gguf(config_for(base_without_template), adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert files_hash(run) == before
    assert result.roundtrip.ok and result.roundtrip.clear > 0
    assert "tokenizer.chat_template" not in gguf.GGUFReader(result.gguf).fields
    assert 'TEMPLATE """{{ .Prompt }}"""' in result.modelfile.read_text()
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma 3's SentencePiece-style tokenizer (BPE with byte fallback), from the built-in
    gemma3-270m asset's cache folder."""
    if not (GEMMA_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("the gemma3-270m asset is not in the cache")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(GEMMA_TOKENIZER)


@pytest.mark.slow
def test_sentencepiece_family_round_trip(gemma_tokenizer, tmp_path):
    """A tiny Gemma 3 with Gemma's own tokenizer: a "llama" vocabulary with scores and types, no
    chat template (the base model's), read back by transformers."""
    base = tiny_family("gemma3_text", gemma_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", targets="all-linear")
    result = export_gguf(config_for(base), adapter, tmp_path / "out", "f16", progress=lambda m: None)
    print(result.roundtrip.summary())
    assert result.roundtrip.ok and result.roundtrip.clear > 0
    fields = gguf.GGUFReader(result.gguf).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[gemma_tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[gemma_tokenizer.eos_token_id] == gguf.TokenType.CONTROL
