"""SafeTrainer's logits at trained positions only: the same loss, gradients, validation loss
and token accuracy as the full computation; and the optimizer it asks for."""
from __future__ import annotations

import pytest
import torch
from conftest import alpaca

from nb_finetune import config, modeling
from nb_finetune.data.collator import CompletionOnlyCollator, trained_positions
from nb_finetune.data.formatter import IGNORE, Formatter
from nb_finetune.data.tokens import tokenize_frame
from nb_finetune.training.policy import optimizer_and_checkpointing
from nb_finetune.training.trainer import SafeTrainer, predicted_ids, token_accuracy


def test_trained_positions_pick_the_positions_before_each_trained_token():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    keep, following = trained_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert following.tolist() == [7, 8, 5]


@pytest.mark.slow
def test_logits_at_trained_positions_only_give_the_same_loss_and_gradients(smollm2_dir, tokenizer, shared_data,
                                                                          tmp_path):
    """SmolLM2-135M with LoRA on real Alpaca rows: the trainer's loss with the vocabulary
    projection at trained positions only equals the full one, and so do the adapter gradients."""
    from transformers import TrainingArguments
    fmt = Formatter.build(tokenizer, "completion", [], max_length=192)
    dataset, _ = tokenize_frame(alpaca(shared_data, slice(0, 6)), fmt)
    batch = CompletionOnlyCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    mcfg = config.ModelConfig()
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    model.train()
    assert modeling.keeps_logits_selectively(model)
    trained = int((batch["labels"] != IGNORE).sum())
    assert 0 < trained < batch["labels"].numel() * 0.9  # prompts and padding are not trained

    def loss_and_grads(selective: bool):
        trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                  report_to="none"))
        trainer.trained_logits_only = selective
        model.zero_grad()
        with torch.random.fork_rng():  # the same dropout masks in both passes
            torch.manual_seed(1)
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(trained))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_classification_head_keeps_its_usual_loss(tiny_model_dir):
    """Models without `logits_to_keep` (sequence classification) train as before."""
    from transformers import AutoModelForSequenceClassification
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert not modeling.keeps_logits_selectively(head)


def test_validation_at_trained_positions_only_gives_the_same_loss_and_accuracy(tiny_model_dir, tokenizer,
                                                                                shared_data, tmp_path):
    """The trainer's validation on real Alpaca rows: with logits only where a trained token is
    predicted, the loss and the token accuracy are those of the full computation, and so they
    are without the logits (the CPU kernels' fused loss, in chunks)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from nb_finetune.kernels.loss import FusedCausalLMLoss
    rows, _ = tokenize_frame(alpaca(shared_data, slice(0, 20)), Formatter.build(tokenizer, "completion", [],
                                                                               max_length=128))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
    found = {}
    # every position; trained positions only; and those without logits (chunked, as on a CPU)
    for selective, chunked in ((False, False), (True, False), (True, True)):
        trainer = SafeTrainer(
            model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                per_device_eval_batch_size=6),
            eval_dataset=rows, data_collator=CompletionOnlyCollator(tokenizer.pad_token_id),
            compute_metrics=token_accuracy, preprocess_logits_for_metrics=predicted_ids)
        trainer.trained_logits_only = selective
        if chunked:
            trainer.fused_loss = FusedCausalLMLoss.for_model(model, torch.float32)
            trainer.fused_loss.chunk_rows = 16  # several chunks a batch
        found[selective, chunked] = trainer.evaluate()
    for variant in ((True, False), (True, True)):
        assert found[variant]["eval_loss"] == pytest.approx(found[False, False]["eval_loss"], rel=1e-5)
        assert found[variant]["eval_accuracy"] == found[False, False]["eval_accuracy"]
    assert 0 < found[True, True]["eval_accuracy"] < 1  # some right, some wrong: the comparison has teeth


def test_fused_adamw_is_the_default_and_updates_as_the_multi_tensor_one():
    """Without a quantized base on a GPU the trainer asks for torch's fused AdamW, whose updates
    on adapter-shaped tensors (LoRA A and B of SmolLM2's projections) are the multi-tensor
    AdamW's to float rounding."""
    assert optimizer_and_checkpointing(config.TrainConfig(), quantized=False) == ("adamw_torch_fused", False)
    torch.manual_seed(0)
    shapes = [(16, 576), (576, 16), (16, 576), (1536, 16), (16, 1536), (576, 16)]
    start = [torch.randn(s) * 0.02 for s in shapes]
    grads = [[torch.randn(s) * 1e-3 for s in shapes] for _ in range(5)]
    found = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=fused, foreach=not fused)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        found[fused] = params
    for a, b, s in zip(found[True], found[False], start):
        assert not torch.equal(a.detach(), s)  # it moved
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
