"""Padding-free batches (train.padding_free): a batch's rows end to end in one row compute the
loss the padded batch computes, attention kept inside each row, and no padding is left; where
the rows cannot be kept apart, 'on' refuses and 'auto' pads."""
from __future__ import annotations

import pytest
import torch
from conftest import alpaca, prepared_session, tiny_run_config

from nb_finetune import hardware
from nb_finetune.config import TrainConfig
from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import tokenize_frame
from nb_finetune.errors import UserError
from nb_finetune.training import Callback
from nb_finetune.training.policy import use_padding_free


def losses(model, rows, pad_id, tmp_path):
    """The trainer's loss on the rows padded, flattened, and flattened with one causal mask over
    the whole row (rows attending to the rows before them: what must not happen)."""
    from transformers import TrainingArguments

    from nb_finetune.training.trainer import SafeTrainer
    trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"))
    padded = CompletionOnlyCollator(pad_id)(rows)
    flat = CompletionOnlyCollator(pad_id, flatten=True)(rows)
    with torch.no_grad():
        mixed = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"], labels=flat["labels"])
        return (trainer.compute_loss(model, dict(padded)).item(), trainer.compute_loss(model, dict(flat)).item(),
                mixed.loss.item())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_flattened_batch_has_the_loss_of_the_padded_batch(attention, tiny_model_dir, tokenizer, shared_data,
                                                          tmp_path):
    from transformers import AutoModelForCausalLM
    rows, _ = tokenize_frame(alpaca(shared_data, slice(0, 6)), Formatter.build(tokenizer, "completion", [], 128))
    rows = [rows[i] for i in range(len(rows))]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of several lengths: the padded batch pads
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    padded, flat, mixed = losses(model, rows, tokenizer.pad_token_id, tmp_path)
    assert flat == pytest.approx(padded, rel=1e-5)
    assert abs(mixed - padded) > 100 * abs(flat - padded)  # the check would see rows attending to each other


@pytest.mark.slow
def test_flattened_batch_has_the_loss_of_the_padded_batch_with_smollm2(smollm2_dir, tokenizer, shared_data, tmp_path):
    """The real SmolLM2-135M on real Alpaca rows, the rows seeing each other telling on the loss."""
    from transformers import AutoModelForCausalLM
    rows, _ = tokenize_frame(alpaca(shared_data, slice(20, 28)), Formatter.build(tokenizer, "completion", [], 256))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    padded, flat, mixed = losses(model, [rows[i] for i in range(len(rows))], tokenizer.pad_token_id, tmp_path)
    assert flat == pytest.approx(padded, rel=1e-5)
    assert abs(mixed - padded) > max(1e-3, 100 * abs(flat - padded))


def train_run(tiny_model_dir, tmp_path, frame, padding_free):
    messages, infos = [], []

    class Begin(Callback):
        def on_train_begin(self, info):
            infos.append(info)
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path / padding_free, max_steps=3, eval_steps=3,
                                         padding_free=padding_free), frame)
    s.progress = messages.append
    return s.train([Begin()]), messages, infos[0]


def test_training_padding_free_on_a_cpu_trains_the_same_steps_with_no_padding(tiny_model_dir, tmp_path, sst2_frame):
    """The whole path (sampler, CPU kernels, accumulation, validation): the same losses as padded
    batches, the padding share reported before and after."""
    flat, said, info = train_run(tiny_model_dir, tmp_path, sst2_frame, "on")
    padded, _, padded_info = train_run(tiny_model_dir, tmp_path, sst2_frame, "off")
    assert info["padding_free"] is True and padded_info["padding_free"] is False
    assert any(m.startswith("padding-free batches: each batch's rows in one row, attention kept inside each row by "
                            "SDPA with a block-diagonal mask") for m in said)
    for column in ("train_loss", "val_loss"):
        assert flat.history[column].dropna().tolist() == pytest.approx(padded.history[column].dropna().tolist(),
                                                                       rel=1e-4)
    before, after = flat.padding.shares(), padded.padding.shares()
    assert before["batches_padded"] > 0 and before["as_built"] == 0.0
    assert after["as_built"] == pytest.approx(after["batches_padded"]) and after["batches_padded"] > 0
    assert flat.padding.tokens == padded.padding.tokens  # the same rows, batched the same way
    assert flat.padding.summary() in said


def test_auto_is_off_on_a_cpu_and_on_with_cuda(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if not hardware.cuda_available():
        assert use_padding_free(TrainConfig(), model, causal_lm=True) == (False, "")
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    assert use_padding_free(TrainConfig(), model, causal_lm=True)[0]
    assert use_padding_free(TrainConfig(), model, causal_lm=False) == (False, "")  # a head: one row per input
    assert use_padding_free(TrainConfig(padding_free="off"), model, causal_lm=True) == (False, "")


def test_rows_that_cannot_be_kept_apart_are_refused_by_on_and_padded_by_auto(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "some_kernel"
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    used, note = use_padding_free(TrainConfig(), model, causal_lm=True)
    assert not used and note.endswith("this llama uses 'some_kernel': padding each batch instead")
    with pytest.raises(UserError, match="train.padding_free: on: .*sdpa, eager.*set train.padding_free to auto or off"):
        use_padding_free(TrainConfig(padding_free="on"), model, causal_lm=True)
    with pytest.raises(UserError, match="needs a causal-LM objective"):
        use_padding_free(TrainConfig(padding_free="on"), model, causal_lm=False)
