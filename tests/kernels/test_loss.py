"""The loss without the logits (FusedCausalLMLoss) against transformers' own causal-LM loss:
the same loss and adapter gradients, the same validation loss and predicted tokens, and used
only where it replaces the head exactly."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SUBPROCESS_ENV
from kernel_inputs import adapter_grads, alpaca_batch, lora_model, randomize_lora_b

from nb_finetune import hardware
from nb_finetune.data.formatter import IGNORE
from nb_finetune.kernels.loss import FusedCausalLMLoss
from nb_finetune.training.trainer import SafeTrainer, predicted_ids

# Whole-model checks under bf16 autocast need a CPU with bf16: elsewhere torch emulates it (many
# minutes for SmolLM2), and training there runs in fp32, which the fp32 cases cover.
needs_fast_bf16 = pytest.mark.skipif(not hardware.bf16_supported(), reason="this CPU has no bf16; training here is fp32")


@pytest.fixture(scope="module")
def batch(shared_data, tokenizer):
    return alpaca_batch(shared_data, tokenizer)


def _trainer(model, tmp_path) -> SafeTrainer:
    from transformers import TrainingArguments
    trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    trainer.trained_logits_only = True
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", pytest.param("bfloat16", marks=needs_fast_bf16)])
def test_loss_without_logits_gives_the_same_loss_and_gradients(smollm2_dir, batch, tmp_path, precision):
    """SmolLM2-135M with LoRA on real Alpaca rows: the chunked projection and loss give the
    trainer's loss that the model's own loss gives, in fp32 and under bf16 autocast, with and
    without the token count of the whole batch, and adapter gradients as close to the fp32
    ones as the model's own are; the model has its head and loss back afterwards."""
    torch.manual_seed(0)
    model = lora_model()
    randomize_lora_b(model)
    model.train()
    fused = FusedCausalLMLoss.for_model(model, getattr(torch, precision))
    assert fused is not None and fused.weight.dtype == getattr(torch, precision)
    head = model.get_base_model().lm_head
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    trainer = _trainer(model, tmp_path)

    def loss_and_grads(with_fused: bool, count, autocast: bool):
        trainer.fused_loss = fused if with_fused else None
        model.zero_grad()
        with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(1)  # the same dropout masks in every pass
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
        loss.backward()
        return loss.item(), adapter_grads(model)

    def distance(grads, reference) -> float:  # relative, over all the adapter gradients
        return (sum(float((grads[n] - g).norm()) ** 2 for n, g in reference.items())
                / sum(float(g.norm()) ** 2 for g in reference.values())) ** 0.5

    bf16 = precision == "bfloat16"
    for count in (torch.tensor(trained), None):
        _, exact = loss_and_grads(False, count, autocast=False)
        own_loss, own = loss_and_grads(False, count, autocast=bf16)
        loss, grads = loss_and_grads(True, count, autocast=bf16)
        # transformers' fp32 log-softmax over 49k entries is the less exact of the two (the
        # chunked loss is nearer a float64 computation), hence 1e-5 rather than equality
        assert loss == pytest.approx(own_loss, rel=1e-5)
        if bf16:  # bf16 rounding moves both; the chunked loss must not move them further
            assert distance(grads, exact) <= 1.1 * distance(own, exact)
        else:
            assert distance(grads, exact) < 1e-3
    assert model.get_base_model().lm_head is head and "_loss_function" not in vars(model.get_base_model())
    # Validation (no gradients): the same loss, and the predicted tokens in place of the logits.
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        trainer.fused_loss = None
        own_loss, own = trainer.compute_loss(model, dict(batch), return_outputs=True)
        trainer.fused_loss = fused
        loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert own.logits.shape[-1] == head.out_features and out["predicted_ids"].dtype == torch.long
    assert loss.item() == pytest.approx(own_loss.item(), rel=1e-5)
    assert torch.equal(predicted_ids(out["predicted_ids"], batch["labels"]),
                       predicted_ids(own.logits, batch["labels"]))
    assert model.get_base_model().lm_head is head and fused.predictions is not None


def test_loss_without_logits_is_used_only_where_it_replaces_the_head_exactly(tiny_model_dir):
    """A LoRA-adapted head, or a model type not known to have a plain head, keeps its own loss."""
    model = lora_model(tiny_model_dir)
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is not None
    adapted = lora_model(tiny_model_dir, target_modules="q_proj,lm_head")
    assert FusedCausalLMLoss.for_model(adapted, torch.bfloat16) is None
    cfg = model.get_base_model().config
    cfg.model_type = "gemma2"
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is not None
    cfg.final_logit_softcapping = 30.0  # Gemma 2's default: tanh on the logits before the loss
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is None
    cfg.model_type, cfg.final_logit_softcapping = "gpt2", None  # a type not checked
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is None


VALIDATE = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import pandas as pd, torch
    from transformers import TrainingArguments
    from nb_finetune import config, data, memory, modeling
    from nb_finetune.data.collator import CompletionOnlyCollator
    from nb_finetune.data.formatter import Formatter
    from nb_finetune.data.tokens import TokenizedDataset, tokenize_frame
    from nb_finetune.kernels.loss import FusedCausalLMLoss
    from nb_finetune.training.trainer import SafeTrainer, predicted_ids, token_accuracy
    raw = pd.DataFrame(json.loads((Path(sys.argv[1]) / "alpaca_demo" / "alpaca_en_demo.json").read_text()))
    frame = data.normalize(raw.iloc[:200], config.DataConfig(task="completion"))
    mcfg = config.ModelConfig()
    tok = modeling.load_tokenizer(mcfg, progress=lambda m: None)
    rows, _ = tokenize_frame(frame, Formatter.build(tok, "completion", [], 256))
    rows = TokenizedDataset(sorted(rows.features, key=lambda f: -len(f["input_ids"]))[:8])  # 8 x 256, mostly trained
    model = modeling.load_base(mcfg, "completion", progress=lambda m: None).requires_grad_(False)
    trainer = SafeTrainer(
        model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none",
                                            per_device_eval_batch_size=8),
        eval_dataset=rows, data_collator=CompletionOnlyCollator(tok.pad_token_id),
        compute_metrics=token_accuracy, preprocess_logits_for_metrics=predicted_ids)
    trainer.trained_logits_only = True
    found = {}
    # Chunked first: the logits' passes free up to 1.5 GB that a later pass could reuse unseen.
    for way, fused in (("chunked", FusedCausalLMLoss.for_model(model, torch.float32)), ("logits", None)):
        trainer.fused_loss = fused
        trainer.evaluate()  # the first pass settles what stays allocated
        memory.reset_peak()
        before = memory.measured_peak()
        metrics = trainer.evaluate()
        found[way] = {"growth": memory.measured_peak() - before, "loss": metrics["eval_loss"],
                      "accuracy": metrics["eval_accuracy"]}
    print(json.dumps(found))
""")


@pytest.mark.slow
@pytest.mark.skipif(hardware.cuda_available(), reason="the chunked validation is the CPU's")
def test_validation_on_a_cpu_keeps_no_logits(shared_data, tmp_path):
    """SmolLM2-135M validating 8 x 256 Alpaca rows (about 2,000 trained positions) in a fresh
    process: with the logits of the trained positions the peak grows by their size (2,000 x
    49k fp32, twice: logits and log-softmax); without them (the fused loss's chunks, what
    training on a CPU does) by little, with the same loss and token accuracy."""
    proc = subprocess.run([sys.executable, "-c", VALIDATE, str(shared_data)], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["logits"]["growth"] > 500e6, found
    assert found["chunked"]["growth"] < 200e6, found
    assert found["chunked"]["loss"] == pytest.approx(found["logits"]["loss"], rel=1e-5)
    assert found["chunked"]["accuracy"] == found["logits"]["accuracy"]

