"""A 4-bit or 8-bit base (bitsandbytes on the CPU) under the LoRA adapter: it trains, and an
evaluation pass before a step leaves that step's gradients as they were."""
import pytest
from conftest import prepared_session

from nb_finetune import RunConfig


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_on_cpu(bits, tiny_model_dir, tmp_path, sst2_frame):
    pytest.importorskip("bitsandbytes")
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence"},
        "model": {"name": str(tiny_model_dir), "quantization": bits, "lora_r": 4},
        "train": {"output_dir": str(tmp_path / "q"), "max_steps": 2, "batch_size": 4, "max_length": 48, "logging_steps": 1,
                  "eval_steps": 2}})
    s = prepared_session(cfg, sst2_frame)
    s.load_model()
    import bitsandbytes as bnb
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    assert any(isinstance(mod, layer) for mod in s.model.modules())
    result = s.train()
    assert result.global_step == 2 and result.history["train_loss"].notna().all()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_4bit_training_after_an_evaluation_pass_gets_the_same_gradients(tiny_model_dir, tmp_path, sst2_frame):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel with no backward on the
    first eval-mode pass; validation before a training step must not change that step's gradients."""
    pytest.importorskip("bitsandbytes")
    import torch
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence"},
        "model": {"name": str(tiny_model_dir), "quantization": "4bit", "lora_r": 4, "lora_dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "q"), "max_length": 48}})

    def adapter_gradients(evaluate_first: bool) -> dict:
        s = prepared_session(cfg, sst2_frame)
        s.load_model()
        batch = s.collator([s.datasets["train"][i] for i in range(4)])
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        torch.manual_seed(0)
        for p in s.model.parameters():  # LoRA B starts at zero: give every adapter a gradient path
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        if evaluate_first:
            s.model.eval()
            with torch.no_grad():
                s.model(**batch)
        s.model.train()
        s.model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.requires_grad}

    fresh, after_eval = adapter_gradients(False), adapter_gradients(True)
    assert fresh.keys() == after_eval.keys() and len(fresh) > 0
    first_layer = [n for n in fresh if ".layers.0." in n]
    assert first_layer and all(fresh[n].abs().sum() > 0 for n in first_layer)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-4, atol=1e-6, msg=name)
