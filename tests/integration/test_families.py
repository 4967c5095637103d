"""The architecture matrix: a tiny random-weight decoder of each family (docs/models_table.py)
goes through the path a user takes, a folder with config, weights and the SmolLM2 tokenizer,
then the engine with `model.name` set to that folder. Each trains to the same losses with the
CPU kernels on and off; with @slow, each runs QLoRA steps, merges, and exports GGUF f16 and
q8_0 with the round trip, or, where the writer lacks the family, is refused before the merge.
The supported families are the writer's own list, so the matrix tightens as the writer grows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_docs_module

from nb_finetune import UserError, hardware, kernels
from nb_finetune.export import export_gguf, gguf_export, gguf_layout, merge
from nb_finetune.training import Callback

models_table = load_docs_module("models_table")
FAMILIES = list(models_table.FAMILIES)
SUPPORTED = [f for f in FAMILIES if models_table.gguf_supported(f)]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, smollm2_dir):
    """model_type -> its tiny folder, each built once per test process."""
    built = {}

    def folder(model_type):
        if model_type not in built:
            built[model_type] = models_table.build(model_type, smollm2_dir, tmp_path_factory.mktemp(model_type))
        return built[model_type]
    return folder


class Switched(Callback):
    """The line training logs about the kernels it switched on."""
    line = ""

    def on_train_begin(self, info):
        self.line = info["kernels"]


def described(line: str) -> dict[str, bool]:
    """What the training log says was switched on, in kernels.applicable's terms."""
    return {"LoRA layer": "LoRA layers" in line and "LoRA layers (0)" not in line,
            "attention": "attention for rows" in line, "fused loss": "fused loss" in line}


@pytest.mark.skipif(hardware.cuda_available(), reason="auto leaves the kernels off on a GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_to_the_same_losses_with_the_kernels_on_and_off(family, family_dir, sst2_frame, tmp_path):
    histories, seen = {}, {}
    for setting in ("off", "auto"):
        cfg = models_table.run_config(family_dir(family), tmp_path / setting, setting, lora_dropout=0.0)
        seen[setting] = Switched()
        session = models_table.trained(cfg, sst2_frame, [seen[setting]])
        histories[setting] = session.train_result.history
    off, auto = histories["off"], histories["auto"]
    assert off["step"].tolist() == auto["step"].tolist() == [1, 2, 3]
    assert off["train_loss"].iloc[-1] != off["train_loss"].iloc[0]  # it trained: the comparison has teeth
    np.testing.assert_allclose(auto["train_loss"], off["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(auto["val_loss"].dropna(), off["val_loss"].dropna(), rtol=1e-4)
    # The public answer (docs/models.md's kernel column) is what training switched on.
    applies = kernels.applicable(session.model)
    assert {k: applies[k] for k in ("LoRA layer", "attention", "fused loss")} == described(seen["auto"].line)
    assert seen["off"].line == "CPU kernels: off (train.cpu_kernels)"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_merge_and_gguf(family, family_dir, sst2_frame, tmp_path, monkeypatch):
    """QLoRA steps on a 4-bit base, the adapter merged into the full-precision base (the merged
    model computes what base + adapter compute), then GGUF f16 and q8_0 with the round trip;
    a family the writer lacks is refused in one line before the merge."""
    import bitsandbytes as bnb
    cfg = models_table.run_config(family_dir(family), tmp_path / "qlora", quantization="4bit",
                                  **models_table.SETTINGS.get(family, {}))
    session = models_table.trained(cfg, sst2_frame)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in session.model.modules())
    assert np.isfinite(session.train_result.history["train_loss"]).all()
    adapter = session.train_result.adapter_dir
    merged, tokenizer = merge(cfg, adapter, progress=lambda m: None)
    assert_merge_adds_the_adapter(merged, cfg, adapter)
    if family not in SUPPORTED:
        monkeypatch.setattr(gguf_export, "merge", lambda *a, **k: pytest.fail("merged before refusing"))
        with pytest.raises(UserError, match=f"^GGUF export: not supported yet: {family} \\(supported: ") as err:
            export_gguf(cfg, adapter, tmp_path / "gguf", "f16", progress=lambda m: None)
        assert "\n" not in str(err.value) and not (tmp_path / "gguf").exists()
        return
    for quant in models_table.QUANTS:
        check = export_gguf(cfg, adapter, tmp_path / quant, quant, progress=lambda m: None).roundtrip
        assert check.ok, check.summary()
        if quant == "f16":
            assert check.top1_same == check.clear > 0, check.summary()


def assert_merge_adds_the_adapter(merged, cfg, adapter):
    """The merged model's logits are the unquantized base's with the adapter on, and not the
    base's alone (the trained adapter changed something)."""
    from dataclasses import replace

    from nb_finetune import modeling
    plain = replace(cfg.model, quantization="none")
    with_adapter = modeling.load_adapter(modeling.load_base(plain, "completion", progress=lambda m: None),
                                         adapter, cfg.model.name)
    ids = torch.tensor([[1, 200, 3000, 40000, 7, 9]])
    with torch.no_grad():
        want = with_adapter(ids).logits
        got = merged(ids).logits
        with with_adapter.disable_adapter():
            base = with_adapter(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 1e-3


def test_a_family_the_writer_lacks_is_refused_in_one_line_naming_the_supported_ones(tmp_path, monkeypatch):
    """gpt2 is outside the writer's list: refused from the config alone, before any merge."""
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1000)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(gguf_export, "merge", lambda *a, **k: pytest.fail("merged before refusing"))
    cfg = models_table.run_config(tmp_path / "gpt2", tmp_path / "run")
    with pytest.raises(UserError) as err:
        export_gguf(cfg, tmp_path / "adapter", tmp_path / "out", "f16", progress=lambda m: None)
    message = str(err.value)
    assert message.startswith("GGUF export: not supported yet: gpt2") and "\n" not in message
    assert all(name in message for name in gguf_layout.FAMILIES)


def test_a_mixture_of_experts_with_lora_dropout_is_told_to_set_it_to_0(family_dir):
    """peft adapts qwen3_moe's fused experts as parameters, which take no dropout: the default
    lora_dropout is refused in one line naming the fix, and 0 trains (the matrix above)."""
    from nb_finetune import modeling
    from nb_finetune.config import ModelConfig
    cfg = ModelConfig(name=str(family_dir("qwen3_moe")), lora_dropout=0.05)
    base = modeling.load_base(cfg, "completion", progress=lambda m: None)
    with pytest.raises(UserError, match=r"^model.lora_dropout=0.05: .*set model.lora_dropout: 0$"):
        modeling.add_lora(base, cfg, "completion")
