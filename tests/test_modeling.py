"""modeling, step by step on the tiny llama: names resolved to folders, the objective a model
gets, the quantization asked for, LoRA on the named modules, and adapters loaded only onto the
base they were trained on. Each refusal is one UserError naming the setting that fixes it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nb_finetune import modeling
from nb_finetune.config import ModelConfig
from nb_finetune.errors import UserError


def test_resolve_gives_a_folder_passes_a_hub_id_and_refuses_what_is_neither(tiny_model_dir, tmp_path):
    assert modeling.resolve(str(tiny_model_dir)) == str(tiny_model_dir)
    assert modeling.resolve("some-org/some-model") == "some-org/some-model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        modeling.resolve(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="model folder not found"):
        modeling.resolve(str(tmp_path / "missing"))


def test_an_unreachable_hub_id_names_the_built_in_models(monkeypatch):
    monkeypatch.setattr(modeling.hardware, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match=r"not a built-in name \(.*smollm2-135m-instruct.*\)"):
        modeling.load_config(ModelConfig(name="no-such-org/no-such-model"))


def test_the_objective_follows_the_architecture():
    decoder, encoder = AutoConfig.for_model("llama"), AutoConfig.for_model("bert")
    assert modeling.objective_for(ModelConfig(objective="auto"), decoder) == "completion"
    assert modeling.objective_for(ModelConfig(objective="auto"), encoder) == "head"
    assert modeling.objective_for(ModelConfig(objective="head"), decoder) == "head"
    with pytest.raises(UserError, match="needs a decoder.*use objective 'head'"):
        modeling.objective_for(ModelConfig(objective="completion", name="enc"), encoder)


def test_quantization_config_asks_bitsandbytes_for_what_the_settings_say():
    assert modeling.quantization_config(ModelConfig(quantization="none")) is None
    four = modeling.quantization_config(ModelConfig(quantization="4bit", quant_type="fp4", double_quant=False,
                                                    compute_dtype="float32"))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32
    assert modeling.quantization_config(ModelConfig(quantization="8bit")).load_in_8bit


def test_a_decoder_classifies_from_its_last_non_pad_token(tiny_model_dir, tokenizer):
    model = modeling.load_base(ModelConfig(name=str(tiny_model_dir)), "head", labels=["no", "yes"],
                               pad_token_id=tokenizer.pad_token_id, progress=lambda m: None)
    assert model.config.id2label == {0: "no", 1: "yes"} and model.config.label2id == {"no": 0, "yes": 1}
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.score.out_features == 2


def test_lora_goes_on_the_named_modules_only(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), lora_r=4, lora_alpha=8, target_modules="q_proj, v_proj")
    model = modeling.add_lora(modeling.load_base(cfg, "completion", progress=lambda m: None), cfg, "completion")
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    trainable, total = modeling.trainable_parameters(model)
    lora_weights = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora_weights and 0 < trainable < total
    assert modeling.keeps_logits_selectively(model)


def test_lora_on_a_module_the_model_lacks_names_the_setting(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), target_modules="qkv_proj")
    base = modeling.load_base(cfg, "completion", progress=lambda m: None)
    with pytest.raises(UserError, match=r"^model.target_modules='qkv_proj': "):
        modeling.add_lora(base, cfg, "completion")


def test_a_mixture_of_experts_refusal_names_the_dropout_setting():
    why = "ParamWrapper does not support lora_dropout != 0"
    assert "set model.lora_dropout: 0" in modeling.lora_refused(ModelConfig(lora_dropout=0.05), why)
    assert modeling.lora_refused(ModelConfig(target_modules="x"), "no x").startswith("model.target_modules='x'")


def test_an_adapter_loads_only_onto_its_own_base(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name=str(tiny_model_dir), lora_r=4, lora_alpha=8)
    with pytest.raises(UserError, match="no adapter in .*: train first"):
        modeling.load_adapter(None, tmp_path / "nothing", cfg.name)
    tuned = modeling.add_lora(modeling.load_base(cfg, "completion", progress=lambda m: None), cfg, "completion")
    tuned.save_pretrained(tmp_path / "adapter")
    assert modeling.adapter_base(tmp_path / "adapter") == str(tiny_model_dir)
    again = modeling.load_adapter(modeling.load_base(cfg, "completion", progress=lambda m: None),
                                  tmp_path / "adapter", cfg.name)
    assert modeling.trainable_parameters(again)[1] == modeling.trainable_parameters(tuned)[1]

    wider = AutoConfig.from_pretrained(tiny_model_dir)
    wider.hidden_size, wider.intermediate_size = 128, 256
    other = AutoModelForCausalLM.from_config(wider)
    with pytest.raises(UserError, match=f"trained on another base than other.*it names {tiny_model_dir}"):
        modeling.load_adapter(other, tmp_path / "adapter", "other")


def test_an_adapter_config_without_a_base_names_none(tmp_path):
    assert modeling.adapter_base(tmp_path) == ""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    assert modeling.adapter_base(tmp_path) == ""
    assert str(modeling.another_base(tmp_path, "b")).endswith("than b: set model.name to the base it was trained on")


def test_4bit_layers_are_kept_off_the_packed_inference_kernel():
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    layers[0].support_avx512bf16_for_cpu = True
    layers[2].support_avx512bf16_for_cpu = True
    assert modeling.keep_4bit_weights_trainable(layers) == 2
    assert not layers[0].support_avx512bf16_for_cpu and not layers[2].support_avx512bf16_for_cpu
