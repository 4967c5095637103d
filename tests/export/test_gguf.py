"""GGUF export: the file read back by transformers in another process matches the merged model
(logits, greedy answers, stopping at end-of-turn), carries tokenizer, chat template and special
ids, the Modelfile's template renders what the chat template renders, and bad input is refused
with one line, leaving nothing behind."""
import re
import subprocess
import sys
from types import SimpleNamespace

import gguf
import pytest
import torch
from conftest import SUBPROCESS_ENV

from nb_finetune import RunConfig, UserError
from nb_finetune.export import export_gguf, gguf_export, gguf_file, gguf_layout, merge, modelfile, roundtrip


def make_adapter(base_dir, folder, seed=0, targets=("q_proj", "k_proj", "v_proj", "down_proj"), b_scale=1.0):
    """A LoRA adapter with random (non-zero) weights, so the merge changes the model; `b_scale`
    shrinks peft's random B (see test_gguf_families.ADAPTER_B_SCALE)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets if isinstance(targets, str) else list(targets),
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(folder)
    return folder


def config_for(model_dir):
    return RunConfig.from_dict({"model": {"name": str(model_dir)}})


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_round_trip(quant, smollm2_dir, tokenizer, tmp_path):
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter")
    result = export_gguf(config_for(smollm2_dir), adapter, tmp_path / "out", quant, progress=lambda m: None)
    check = result.roundtrip
    assert check.ok and check.max_logit_diff <= roundtrip.BOUNDS[quant]
    assert check.top1_same == check.clear > 0
    # An instruct model answering short questions ends its turn: the stop token survived.
    assert check.stops and all(check.stops)
    fields = gguf.GGUFReader(result.gguf).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert sorted(p.name for p in result.folder.iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_tiny_f16_round_trip_and_folder(tiny_model_dir, tiny_adapter, tmp_path):
    result = export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert result.roundtrip.ok and result.roundtrip.top1_same == result.roundtrip.clear
    assert "ollama create out -f Modelfile" in (result.folder / "README.md").read_text()
    # A second export into the same folder is refused unless forced, and the first stays intact.
    size = result.gguf.stat().st_size
    with pytest.raises(UserError, match="exists.*--force"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "q8_0", progress=lambda m: None)
    assert result.gguf.stat().st_size == size
    forced = export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "q8_0", force=True,
                         progress=lambda m: None)
    assert forced.gguf.stat().st_size < size and leftovers(tmp_path) == []


@pytest.mark.slow  # a whole export, read back in a fresh process
def test_wrong_rotary_layout_fails_and_leaves_nothing(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    """The round trip catches a writer that forgets llama.cpp's Q/K permutation."""
    monkeypatch.setattr(gguf_layout, "rotary_permute", lambda w, heads: w)
    with pytest.raises(UserError, match=r"does not match the merged model.*FAILED: logits differ by"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def render_go(template: str, values: dict) -> str:
    """Ollama's single-turn template language, as far as the Modelfile uses it."""
    def cond(m):
        return m.group(2) if values.get(m.group(1)) else ""
    text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", cond, template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), text)


def test_modelfile_template_renders_like_the_chat_template(tokenizer):
    text = modelfile.modelfile(tokenizer)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    prompt_part = template.split("{{ .Response }}")[0]  # Ollama generates from where .Response starts
    default_system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    stops = re.findall(r'PARAMETER stop "(.*)"', text)
    question = "How do I boil an egg?"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    assert render_go(prompt_part, {"System": default_system, "Prompt": question}) == expected
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert render_go(prompt_part, {"System": "Be brief.", "Prompt": question}) == expected
    # A finished turn, as Ollama keeps it in the history, is the chat template's turn too.
    chat.append({"role": "assistant", "content": "Boil it for eight minutes."})
    assert render_go(template, {"System": "Be brief.", "Prompt": question,
                                "Response": chat[-1]["content"]}) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.eos_token in stops and text.startswith("FROM ./model.gguf")


def test_unknown_quant_and_unsupported_architecture(tiny_model_dir, tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="unknown GGUF quant type 'q3_k'"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "q3_k")
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1000)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"not supported yet: gpt2 \(supported: gemma2, gemma3_text, granite, llama, "
                                        r"mistral, olmo2, phi3, qwen2, qwen3, smollm3\)"):
        export_gguf(config_for(tmp_path / "gpt2"), tiny_adapter, tmp_path / "out", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_merge_too_large_for_memory_is_refused_before_loading(tiny_adapter, tmp_path):
    """A 70B-sized config with no weights at all: the refusal must come from the sizes alone."""
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "big")
    with pytest.raises(UserError, match=r"merging needs about \d+\.\d GiB of memory, \d+\.\d GiB is free"):
        export_gguf(config_for(tmp_path / "big"), tiny_adapter, tmp_path / "out", "q4_0")
    assert not (tmp_path / "out").exists()


def never_merged(*args, **kwargs):
    raise AssertionError("the export loaded weights before refusing")


def test_adapter_from_another_base_is_refused_before_loading(smollm2_dir, tiny_model_dir, tiny_adapter, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(gguf_export, "merge", never_merged)
    with pytest.raises(UserError, match=rf"trained on another base .*it names {re.escape(str(tiny_model_dir))}; "
                                        r"model\.layers\.0\.\S+ is \d+ wide in the base, \d+ in the adapter\)"):
        export_gguf(config_for(smollm2_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_merge_says_another_base_in_one_line(smollm2_dir, tiny_model_dir, tiny_adapter, tmp_path):
    """The merge on its own (the Export panel's merged model) says it too, once the base is loaded."""
    said = []
    with pytest.raises(UserError, match="trained on another base"):
        merge(config_for(smollm2_dir), tiny_adapter, progress=said.append)
    assert f"the adapter says it was trained on {tiny_model_dir}" in " ".join(said)


def test_merging_a_4bit_base_says_it_dequantizes(tiny_model_dir, tiny_adapter):
    cfg = config_for(tiny_model_dir)
    cfg.model.quantization = "4bit"
    said = []
    merged, _ = merge(cfg, tiny_adapter, progress=said.append)
    assert "dequantized full-precision copy" in " ".join(said)
    assert merged.dtype == torch.float32 and not getattr(merged, "is_loaded_in_4bit", False)


def test_file_too_large_for_the_disk_is_refused_before_loading(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    """The one place the export reads free space is told the disk is nearly full."""
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    monkeypatch.setattr(gguf_export, "merge", never_merged)
    with pytest.raises(UserError, match=rf"the q8_0 GGUF needs about 0\.\d\d GiB on disk, 0\.00 GiB is free under "
                                        rf"{re.escape(str(tmp_path))}: free space"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "new" / "out", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_without_force(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    monkeypatch.setattr(gguf_export, "merge", never_merged)
    with pytest.raises(UserError, match=r"out exists: choose another output folder, or replace it \(--force"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_cli_refusals_are_one_line(tiny_model_dir, tiny_adapter, tmp_path):
    """An unknown type and an existing folder (no terminal to ask at), before any weights load."""
    cfg = config_for(tiny_model_dir)
    cfg.save(tmp_path / "config.yaml")
    (tmp_path / "gguf").mkdir()
    cmd = [sys.executable, "-m", "nb_finetune", "export", "--config", str(tmp_path / "config.yaml"),
           "--adapter", str(tiny_adapter), "--out", str(tmp_path / "gguf")]
    for quant, says in (("q5", "unknown GGUF quant type 'q5': choose one of f16, q8_0, q4_0"),
                        ("f16", "exists: choose another output folder")):
        bad = subprocess.run(cmd + ["--gguf", quant], capture_output=True, text=True, env=SUBPROCESS_ENV,
                             stdin=subprocess.DEVNULL)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and says in bad.stderr, bad.stderr
    assert list((tmp_path / "gguf").iterdir()) == []


def test_full_disk_is_one_line_and_leaves_nothing(tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf_file, "encode", full)
    with pytest.raises(UserError, match="disk under .* is full"):
        export_gguf(config_for(tiny_model_dir), tiny_adapter, tmp_path / "out", "f16", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_gguf(tiny_model_dir, tiny_adapter, tmp_path):
    cfg = config_for(tiny_model_dir)
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.save(tmp_path / "config.yaml")
    cmd = [sys.executable, "-m", "nb_finetune", "export", "--config", str(tmp_path / "config.yaml"),
           "--adapter", str(tiny_adapter), "--out", str(tmp_path / "gguf")]
    ok = subprocess.run(cmd + ["--gguf", "q4_0"], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert ok.returncode == 0, ok.stderr
    assert "round trip (q4_0" in ok.stdout and (tmp_path / "gguf" / "model.gguf").is_file()
