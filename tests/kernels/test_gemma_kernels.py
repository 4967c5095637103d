"""The fused loss and the short-row attention on Gemma 2 and Gemma 3 (gemma2, gemma3_text),
against kernels off: the same loss and adapter gradients on a tiny random model of each
family whose rows are longer than its sliding window (so the sliding layers' masks matter)
and padded, with Gemma 3's query_pre_attn_scalar unlike its head size; and the kernels left
off where Gemma 2's soft-capping would make them differ."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import adapter_grads, lora_model, randomize_lora_b
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nb_finetune import config, data
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import tokenize_frame
from nb_finetune.kernels import attention
from nb_finetune.kernels.loss import FusedCausalLMLoss
from nb_finetune.training.trainer import SafeTrainer

SLIDING_WINDOW = 16  # shorter than the rows below, which are 40-70 tokens


def tiny_gemma(out, tokenizer, model_type: str, **extra):
    """A 2-layer random model of `model_type` (a sliding layer, then a full one) with
    SmolLM2's tokenizer, saved in `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **extra)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def sst2_batch(sst2_frame, tokenizer):
    frame = data.normalize(sst2_frame.iloc[:8], config.DataConfig(task="classification", text_column="sentence",
                                                                 label_names={"0": "negative", "1": "positive"}))
    rows, _ = tokenize_frame(frame, Formatter.build(tokenizer, "classification", ["negative", "positive"], 128))
    batch = CompletionOnlyCollator(tokenizer.pad_token_id, 8)([rows[i] for i in range(len(rows))])
    assert (batch["attention_mask"] == 0).any() and SLIDING_WINDOW < batch["input_ids"].shape[1] <= attention.SHORT_ROWS
    return batch


def _loss_and_grads(model, batch, tmp_path, fused=None, short=False):
    from transformers import TrainingArguments
    trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"))
    trainer.trained_logits_only, trainer.fused_loss = True, fused
    model.zero_grad()
    with attention.for_training(model) if short else torch.enable_grad():
        used = model.get_base_model().config._attn_implementation
        loss = trainer.compute_loss(model, dict(batch))
        built = getattr(ALL_ATTENTION_FUNCTIONS.get(attention.NAME), "masks_built", 0)  # gone once training ends
    loss.backward()
    return used, loss.item(), torch.cat([g.flatten() for g in adapter_grads(model).values()]), built


@pytest.mark.parametrize("model_type, extra, attention_kernel", [
    ("gemma3_text", {}, True),
    # transformers runs Gemma 2 on eager attention, which the short-row attention leaves alone
    ("gemma2", {"final_logit_softcapping": None, "attn_logit_softcapping": None}, False)])
def test_gemma_kernels_keep_the_loss_and_gradients(tmp_path, tokenizer, sst2_batch, model_type, extra,
                                                    attention_kernel):
    """fp32, LoRA without dropout: with the fused loss, the short-row attention, or both, the
    loss and the adapter gradients are kernels-off's to float rounding."""
    model = lora_model(tiny_gemma(tmp_path / "m", tokenizer, model_type, **extra), lora_dropout=0.0)
    randomize_lora_b(model)
    model.train()
    fused = FusedCausalLMLoss.for_model(model, torch.float32)
    assert fused is not None
    own_attention, own_loss, own, _ = _loss_and_grads(model, sst2_batch, tmp_path)
    for kernels in ({"fused": fused}, {"short": True}, {"fused": fused, "short": True}):
        used, loss, grads, built = _loss_and_grads(model, sst2_batch, tmp_path, **kernels)
        assert used == (attention.NAME if kernels.get("short") and attention_kernel else own_attention)
        assert loss == pytest.approx(own_loss, rel=1e-5)
        assert float((grads - own).norm()) < 1e-4 * float(own.norm())
    if attention_kernel:  # the sliding layer's mask and the full layer's mask: one each per pass
        assert built == 2


def test_gemma2_soft_capping_keeps_the_models_own_loss_and_attention(tmp_path, tokenizer):
    """Gemma 2's defaults soft-cap the logits (tanh before the loss) and the attention scores:
    neither kernel computes that, so both stay off; Gemma 3's defaults cap neither."""
    gemma2 = lora_model(tiny_gemma(tmp_path / "g2", tokenizer, "gemma2"))
    cfg = gemma2.get_base_model().config
    assert cfg.final_logit_softcapping and cfg.attn_logit_softcapping
    assert FusedCausalLMLoss.for_model(gemma2, torch.float32) is None
    cfg._attn_implementation = "sdpa"  # not transformers' choice for Gemma 2, but a user's may be
    with attention.for_training(gemma2) as applies:
        assert not applies and cfg._attn_implementation == "sdpa"
    gemma3 = lora_model(tiny_gemma(tmp_path / "g3", tokenizer, "gemma3_text"))
    assert FusedCausalLMLoss.for_model(gemma3, torch.float32) is not None
    with attention.for_training(gemma3) as applies:
        assert applies


@pytest.mark.slow
def test_gemma3_270m_kernels_keep_the_loss_and_gradients(gemma_dir, sst2_frame, tmp_path):
    """The real Gemma 3 270M with LoRA on four SST-2 rows in its own tokenizer: the fused loss
    and the short-row attention together give kernels-off's loss and adapter gradients."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    frame = data.normalize(sst2_frame.iloc[18:22], config.DataConfig(
        task="classification", text_column="sentence", label_names={"0": "negative", "1": "positive"}))
    rows, _ = tokenize_frame(frame, Formatter.build(tok, "classification", ["negative", "positive"], 64))
    batch = CompletionOnlyCollator(tok.pad_token_id, 8)([rows[i] for i in range(len(rows))])
    model = lora_model(gemma_dir, lora_dropout=0.0, target_modules="q_proj,v_proj")
    randomize_lora_b(model)
    model.train()
    _, own_loss, own, _ = _loss_and_grads(model, batch, tmp_path)
    used, loss, grads, _ = _loss_and_grads(model, batch, tmp_path, FusedCausalLMLoss.for_model(model, torch.float32),
                                        short=True)
    assert used == attention.NAME
    assert loss == pytest.approx(own_loss, rel=1e-5)
    assert float((grads - own).norm()) < 1e-4 * float(own.norm())
