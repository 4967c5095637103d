"""The speed-ups keep the result: each one is checked against the plain computation.

The speeds themselves are measured by benchmarks/train_speed.py, never here.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from nb_finetune import config, data, engine, hardware, modeling
from nb_finetune.tokenization import IGNORE, CompletionOnlyCollator, Formatter, tokenize_frame


@pytest.fixture(scope="module")
def alpaca_batch(shared_data, tokenizer):
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[:6], config.DataConfig(task="completion"))
    fmt = Formatter.build(tokenizer, "completion", [], max_length=192)
    dataset, _ = tokenize_frame(frame, fmt)
    return CompletionOnlyCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def test_trained_positions_pick_the_positions_before_each_trained_token():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    keep, following = engine.trained_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert following.tolist() == [7, 8, 5]


@pytest.mark.slow
def test_logits_at_trained_positions_only_give_the_same_loss_and_gradients(smollm2_dir, alpaca_batch, tmp_path):
    """SmolLM2-135M with LoRA on real Alpaca rows: the trainer's loss with the vocabulary
    projection at trained positions only equals the full one, and so do the adapter gradients."""
    from transformers import TrainingArguments
    mcfg = config.ModelConfig()
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    model.train()
    assert engine.keeps_logits_selectively(model)
    trained = int((alpaca_batch["labels"] != IGNORE).sum())
    assert 0 < trained < alpaca_batch["labels"].numel() * 0.9  # prompts and padding are not trained

    def loss_and_grads(selective: bool):
        trainer = engine._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                            report_to="none"))
        trainer.trained_logits_only = selective
        model.zero_grad()
        with torch.random.fork_rng():  # the same dropout masks in both passes
            torch.manual_seed(1)
            loss = trainer.compute_loss(model, dict(alpaca_batch), num_items_in_batch=torch.tensor(trained))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# Whole-model checks under bf16 autocast need a CPU with bf16: elsewhere torch emulates it (many
# minutes for SmolLM2), and training there runs in fp32, which the fp32 cases cover.
needs_fast_bf16 = pytest.mark.skipif(not hardware.bf16_supported(), reason="this CPU has no bf16; training here is fp32")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", pytest.param("bfloat16", marks=needs_fast_bf16)])
def test_loss_without_logits_gives_the_same_loss_and_gradients(smollm2_dir, alpaca_batch, tmp_path, precision):
    """SmolLM2-135M with LoRA on real Alpaca rows: the chunked projection and loss (lm_loss)
    give the trainer's loss that the model's own loss gives, in fp32 and under bf16 autocast,
    with and without the token count of the whole batch, and adapter gradients as close to
    the fp32 ones as the model's own are; the model has its head and loss back afterwards."""
    from transformers import TrainingArguments
    from nb_finetune.lm_loss import FusedCausalLMLoss
    mcfg = config.ModelConfig()
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    with torch.no_grad():  # a trained-looking adapter, so every adapter has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.train()
    fused = FusedCausalLMLoss.for_model(model, getattr(torch, precision))
    assert fused is not None and fused.weight.dtype == getattr(torch, precision)
    head = model.get_base_model().lm_head
    trained = int((alpaca_batch["labels"][:, 1:] != IGNORE).sum())
    trainer = engine._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                        report_to="none"))
    trainer.trained_logits_only = True

    def loss_and_grads(with_fused: bool, count, autocast: bool):
        trainer.fused_loss = fused if with_fused else None
        model.zero_grad()
        with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(1)  # the same dropout masks in every pass
            loss = trainer.compute_loss(model, dict(alpaca_batch), num_items_in_batch=count)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

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
        own_loss, own = trainer.compute_loss(model, dict(alpaca_batch), return_outputs=True)
        trainer.fused_loss = fused
        loss, out = trainer.compute_loss(model, dict(alpaca_batch), return_outputs=True)
    assert own.logits.shape[-1] == head.out_features and out.logits.dtype == torch.long
    assert loss.item() == pytest.approx(own_loss.item(), rel=1e-5)
    assert torch.equal(engine._argmax_logits(out.logits, alpaca_batch["labels"]),
                       engine._argmax_logits(own.logits, alpaca_batch["labels"]))
    assert model.get_base_model().lm_head is head and fused.predictions is not None


def test_loss_without_logits_is_used_only_where_it_replaces_the_head_exactly(tiny_model_dir):
    """A LoRA-adapted head, or a model type not known to have a plain head, keeps its own loss."""
    from nb_finetune.lm_loss import FusedCausalLMLoss
    mcfg = config.ModelConfig(name=str(tiny_model_dir))
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is not None
    adapted = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None),
                                config.ModelConfig(name=str(tiny_model_dir), target_modules="q_proj,lm_head"),
                                "completion")
    assert FusedCausalLMLoss.for_model(adapted, torch.bfloat16) is None
    model.get_base_model().config.model_type = "gemma2"  # soft-caps its logits
    assert FusedCausalLMLoss.for_model(model, torch.bfloat16) is None


def test_a_classification_head_keeps_its_usual_loss(tiny_model_dir):
    """Models without `logits_to_keep` (sequence classification) train as before."""
    from transformers import AutoModelForSequenceClassification
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert not engine.keeps_logits_selectively(head)


def test_frozen_weights_held_in_bf16_give_the_same_bf16_results_and_come_back(tiny_model_dir, alpaca_batch):
    """Under bf16 autocast, casting the frozen weights once computes what casting them on every
    forward pass computes, and so do adapters (with dropout) that take a bf16 input without
    peft's cast to fp32; afterwards the fp32 weights are the very tensors loaded and the
    adapters cast their input again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    assert modeling.use_fast_dropout(model) > 0
    model.train()
    adapted = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    with torch.no_grad():  # a trained-looking adapter, so its path counts in the result
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    frozen = {n: p.data for n, p in model.named_parameters() if "base_layer" in n}
    assert frozen and all(w.dtype == torch.float32 for w in frozen.values())

    def loss_and_grads():
        model.zero_grad()
        with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)  # the same dropout masks in both passes
            loss = model(**alpaca_batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads()
    with engine.frozen_weights_in(model, "bfloat16"):
        assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        assert all(m.cast_input_dtype_enabled is False for m in adapted)
        loss, grads = loss_and_grads()
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in adapted)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-7, msg=name)
    assert all(p.dtype == torch.float32 and p.data_ptr() == frozen[n].data_ptr()  # the same storage
               for n, p in model.named_parameters() if "base_layer" in n)
    with engine.frozen_weights_in(model, "float32"):  # nothing to do in fp32
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fast_dropout_draws_the_dropout_distribution():
    """FastDropout keeps each element with probability 1 - p, scales by 1/(1 - p), follows
    torch's seed, passes gradients through the mask and is the identity in eval mode."""
    drop = modeling.FastDropout(0.1).train()
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 65536 / (65536 - round(0.1 * 65536))))
    assert out.mean().item() == pytest.approx(1.0, abs=0.004)
    rows, cols = kept.float().mean(1), kept.float().mean(0)  # no striping along either axis
    assert rows.std().item() < 0.03 and cols.std().item() < 0.03
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # the seed decides the mask
    assert not torch.equal(drop(x), out)  # and each call draws a new one

    w = torch.randn(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    drop(w).sum().backward()
    torch.manual_seed(3)
    assert torch.equal(w.grad, drop(torch.ones(400, 1000)))  # d out / d x = mask / (1 - p)
    # bf16 input: x * scale computed in fp32 and rounded once, forward and backward
    xb = torch.randn(400, 1000).bfloat16().requires_grad_()
    torch.manual_seed(5)
    half = drop(xb)
    torch.manual_seed(5)
    mask = drop(torch.ones(400, 1000))  # 0 or scale, the same draw
    assert half.dtype == torch.bfloat16 and torch.equal(half, (xb.detach().float() * mask).bfloat16())
    g = torch.randn(400, 1000).bfloat16()
    half.backward(g)
    assert xb.grad.dtype == torch.bfloat16 and torch.equal(xb.grad, (g.float() * mask).bfloat16())
    assert torch.equal(drop.eval()(x), x)


def test_fast_dropout_under_autocast_writes_what_the_cast_would_have_made():
    """Under bf16 autocast FastDropout writes its output in bf16 (the adapter's matmul would
    cast it anyway): the same values and the same gradient as dropout in fp32 and then the cast."""
    drop = modeling.FastDropout(0.05).train()
    x = torch.randn(64, 576, requires_grad=True)
    torch.manual_seed(1)
    plain = drop(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        out = drop(x)
    assert plain.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, plain.to(torch.bfloat16)) and (out == 0).any()
    g = torch.randn(64, 576).to(torch.bfloat16)
    out.backward(g)
    grad, x.grad = x.grad, None
    plain.to(torch.bfloat16).backward(g)
    assert grad.dtype == torch.float32 and torch.equal(grad, x.grad)


def test_lora_dropout_layers_are_swapped_for_fast_dropout(tiny_model_dir):
    mcfg = config.ModelConfig(name=str(tiny_model_dir), lora_dropout=0.1)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    drops = [m for m in model.modules() if isinstance(m, modeling.FastDropout)]
    assert drops and all(d.p == 0.1 for d in drops)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert modeling.use_fast_dropout(model) == 0  # nothing left to swap


class _Block(torch.nn.Module):
    """q, k and v read one input, as in a transformer block; o reads another."""

    def __init__(self, width: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, torch.nn.Linear(width, width, bias=False))

    def forward(self, x, other):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(other)


def _adapter_is_identity(block: torch.nn.Module) -> None:
    """Frozen weights 0 and A = B = I at scale 1: each layer outputs its adapter's dropped input."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "base_layer" in name:
                p.zero_()
            else:
                p.copy_(torch.eye(p.shape[0]))


def test_layers_that_read_one_input_share_one_dropout_mask():
    """While training, q, k and v, called with one tensor, see one dropout mask (each kept
    element scaled by 1 / (1 - p)); a layer reading another tensor draws its own; a tensor that
    is not the one the mask was drawn for, or was changed in place since, gets a mask of its
    own. In eval mode the adapters see their input as it is. The layers survive pickling."""
    import pickle
    from peft import LoraConfig, get_peft_model
    width, p = 48, 0.2
    scale = 65536 / (65536 - round(p * 65536))  # FastDropout's 1 / (1 - p)
    block = get_peft_model(_Block(width), LoraConfig(r=width, lora_alpha=width, lora_dropout=p,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert modeling.use_fast_dropout(block) == 4 and modeling.use_fast_lora(block) == 4
    layers = {n.rsplit(".", 1)[-1]: m for n, m in block.named_modules() if isinstance(m, modeling.FastLoraLinear)}
    assert layers["q_proj"].same_input is layers["v_proj"].same_input is not None
    assert layers["o_proj"].same_input is None
    _adapter_is_identity(block)
    block.train()
    x, other = torch.randn(256, width), torch.randn(256, width)
    torch.manual_seed(0)
    q, k, v, o = block(x, other)
    assert torch.equal(q, k) and torch.equal(q, v)  # one mask for the three
    kept = q != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)
    torch.testing.assert_close(q[kept], x[kept] * scale)
    o_kept = o != 0
    assert not torch.equal(o_kept, kept) and o_kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)
    assert layers["q_proj"].same_input.x is None  # nothing held once all three have taken their part
    torch.manual_seed(0)
    assert torch.equal(block(x, other)[0], q)  # torch's seed decides the mask

    xg = x.clone().requires_grad_()
    torch.manual_seed(1)
    q, k, v, _ = block(xg, other)
    (q + 2 * k + 3 * v).sum().backward()  # d/dx: 6 x mask / (1 - p), the same mask as forward
    torch.testing.assert_close(xg.grad, 6 * (q.detach() != 0) * scale)

    q = layers["q_proj"](x)
    k = layers["k_proj"](other)  # not the tensor q's mask was drawn for: k works on its own input
    torch.testing.assert_close(k[k != 0], (other * scale)[k != 0])
    y = x.clone()
    q = layers["q_proj"](y)
    y.add_(1.0)  # changed in place after q read it: k must not reuse q's work
    k = layers["k_proj"](y)
    torch.testing.assert_close(k[k != 0], (y * scale)[k != 0])

    block.eval()
    assert all(torch.equal(out, x) for out in block(x, x))
    with torch.inference_mode():
        assert all(torch.equal(out, x) for out in block(x.clone(), x))
    again = pickle.loads(pickle.dumps(block))
    assert all(torch.equal(out, x) for out in again(x, x))
    assert type(again.base_model.model.q_proj) is modeling.FastLoraLinear


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_fast_lora_layers_give_peft_s_loss_and_gradients(tiny_model_dir, alpaca_batch, precision):
    """The same loss and adapter gradients as peft's own LoRA layers: to float rounding in fp32;
    under bf16 autocast (with the frozen weights in bf16, as training runs) as near fp32's as
    peft's are. Evaluation, and the adapters switched off, give what peft gives."""
    from peft.tuners.lora.layer import Linear
    mcfg = config.ModelConfig(name=str(tiny_model_dir), lora_dropout=0.0)  # no masks: comparable
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(layers) == 14 and all(type(m) is modeling.FastLoraLinear for m in layers)
    assert sum(m.same_input is not None for m in layers) == 10  # q, k, v and gate, up of 2 blocks
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)

    def run(fast: bool, dtype: str, train: bool = True):
        for m in layers:
            m.__class__ = modeling.FastLoraLinear if fast else Linear
        model.train(train)
        model.zero_grad()
        with engine.frozen_weights_in(model, dtype), torch.set_grad_enabled(train), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(**alpaca_batch)
        if not train:
            return out.logits.float()
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference_loss, reference = run(False, "float32")
    loss, grads = run(True, precision)
    if precision == "float32":
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    else:
        peft_loss, peft_grads = run(False, precision)
        assert abs(loss - reference_loss) <= 2 * abs(peft_loss - reference_loss) + 1e-3

        def distance(g):  # relative distance of all adapter gradients from fp32's
            return (torch.cat([(g[n] - reference[n]).flatten() for n in reference]).norm()
                    / torch.cat([reference[n].flatten() for n in reference]).norm()).item()
        assert distance(grads) <= 1.5 * distance(peft_grads) and distance(grads) < 0.05
    torch.testing.assert_close(run(True, precision, train=False), run(False, precision, train=False),
                               rtol=0, atol=1e-4 if precision == "float32" else 0.1)
    with model.disable_adapter():
        off = run(True, precision, train=False)
        base = run(False, precision, train=False)
    assert torch.equal(off, base)


@pytest.mark.slow
def test_packed_rows_give_each_row_the_logits_it_has_alone(smollm2_dir, tokenizer, shared_data, tmp_path):
    """SmolLM2 on real Alpaca rows: packed into shared rows and passed the way the trainer
    passes them, every original row gets the same logits and loss as when it is run alone,
    so packing changes how many rows a step holds, not what each row computes."""
    from transformers import AutoModelForCausalLM, TrainingArguments
    from nb_finetune.tokenization import pack
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[20:44], config.DataConfig(task="completion"))
    fmt = Formatter.build(tokenizer, "completion", [], max_length=256)
    rows, _ = tokenize_frame(frame, fmt)
    packed = pack(rows, 256)
    assert len(packed) < len(rows)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    collate = CompletionOnlyCollator(tokenizer.pad_token_id)
    batch = collate([packed[i] for i in range(len(packed))])
    seen = {}
    captured = model.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    trainer = engine._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                        report_to="none"))
    with torch.no_grad():
        packed_loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    captured.remove()
    assert "attention_mask" not in seen and seen["use_cache"] is False
    packed_logits = out.logits
    with torch.no_grad():
        for r, row in enumerate(packed.features):
            starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed_logits[r, a:b], alone, rtol=1e-4, atol=2e-4)
        unpacked = collate([rows[i] for i in range(len(rows))])
        assert packed_loss.item() == pytest.approx(model(**unpacked).loss.item(), rel=1e-4)


def test_validation_at_trained_positions_only_gives_the_same_loss_and_accuracy(tiny_model_dir, tokenizer,
                                                                                shared_data, tmp_path):
    """The trainer's validation on real Alpaca rows: with logits only where a trained token is
    predicted, the loss and the token accuracy are those of the full computation."""
    from transformers import AutoModelForCausalLM, TrainingArguments
    raw = pd.DataFrame(json.loads((shared_data / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    frame = data.normalize(raw.iloc[:20], config.DataConfig(task="completion"))
    rows, _ = tokenize_frame(frame, Formatter.build(tokenizer, "completion", [], max_length=128))
    from nb_finetune.lm_loss import FusedCausalLMLoss
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
    found = {}
    # every position; trained positions only; and those without logits (chunked, as on a CPU)
    for selective, chunked in ((False, False), (True, False), (True, True)):
        trainer = engine._trainer_class()(
            model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                per_device_eval_batch_size=6),
            eval_dataset=rows, data_collator=CompletionOnlyCollator(tokenizer.pad_token_id),
            compute_metrics=engine.token_accuracy, preprocess_logits_for_metrics=engine._argmax_logits)
        trainer.trained_logits_only = selective
        if chunked:
            trainer.fused_loss = FusedCausalLMLoss.for_model(model, torch.float32)
            trainer.fused_loss.chunk_rows = 16  # several chunks a batch
        found[selective, chunked] = trainer.evaluate()
    for variant in ((True, False), (True, True)):
        assert found[variant]["eval_loss"] == pytest.approx(found[False, False]["eval_loss"], rel=1e-5)
        assert found[variant]["eval_accuracy"] == found[False, False]["eval_accuracy"]
    assert 0 < found[True, True]["eval_accuracy"] < 1  # some right, some wrong: the comparison has teeth


def _attention_inputs(length: int, padded: int = 0, packed: bool = False, dtype=torch.bfloat16):
    """SmolLM2's attention shape (9 query heads over 3 key/value heads of 64), a causal mask
    with right padding on the first row or two rows packed into the second."""
    torch.manual_seed(0)
    query = torch.randn(2, 9, length, 64, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(2, 3, length, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    allowed = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
    if padded:
        allowed[0, :, :, length - padded:] = False
    if packed:
        half = length // 2
        allowed[1, :, half:, :half] = False
    return query, key, value, allowed


class _Module:  # what the attention function reads from transformers' attention module
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("length,padded,packed", [(64, 0, False), (80, 13, False), (150, 0, True)])
def test_short_row_attention_backward_is_as_exact_as_torchs(length, padded, packed):
    """The CPU attention for short rows: the same forward as torch's sdpa, and gradients at least
    as near a float64 computation as sdpa's own (the mask: causal, padded or packed; grouped
    heads)."""
    from nb_finetune import attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    query, key, value, allowed = _attention_inputs(length, padded, packed)
    grad_out = torch.randn(2, length, 9, 64, dtype=torch.bfloat16)
    mask = None if not (padded or packed) else allowed  # transformers leaves out a purely causal mask

    def run(fn, tensors):
        out = fn(_Module(), *tensors, mask, scaling=64 ** -0.5)[0]
        return out, torch.autograd.grad(out, tensors, grad_out.to(out.dtype))

    def distance(found, exact):
        return max(float((f.double() - e).norm() / e.norm()) for f, e in zip(found, exact))

    _, exact_grads = run(sdpa_attention_forward, [t.detach().double().requires_grad_()
                                                  for t in (query, key, value)])
    sdpa_out, sdpa_grads = run(sdpa_attention_forward, [query, key, value])
    calls = []
    apply = attention._ShortAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention._ShortAttention, "apply", lambda *a: calls.append(1) or apply(*a))
        out, grads = run(attention.attention_forward, [query, key, value])
    assert calls  # the short-row path ran
    torch.testing.assert_close(out, sdpa_out, rtol=0, atol=0)
    assert distance(grads, exact_grads) <= distance(sdpa_grads, exact_grads)


def test_short_row_attention_builds_each_mask_once_and_never_reuses_a_stale_one():
    """The layers of one pass share the stacked mask; a new mask of the same shape (the next
    batch's padding) gets its own, and each output is torch's for the mask it was given."""
    from nb_finetune import attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    query, key, value, first = _attention_inputs(80, padded=13)
    second = first.clone()
    second[0, :, :, 80 - 13:] = True
    second[1, :, :, 80 - 30:] = False  # the same shape, other rows padded
    built = []
    stack = attention._stacked_mask
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "_stacked_mask", lambda *a: built.append(a[0]) or stack(*a))
        outs = [attention.attention_forward(_Module(), query, key, value, mask, scaling=0.125)[0]
                for mask in (first, first, second, second, first)]
    assert [m is first for m in built] == [True, True, False, False, True]
    for out, mask in zip(outs, (first, first, second, second, first)):
        want = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.125)[0]
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert attention._stacked_mask(first, 80, 3, torch.bfloat16, query.device) is \
        attention._stacked_mask(first, 80, 3, torch.bfloat16, query.device)  # built once, then reused
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (query, key, value))
    assert all(torch.isfinite(g).all() for g in grads)


def test_long_rows_and_no_gradient_go_to_torchs_attention():
    """Past SHORT_ROWS, or without a gradient, transformers' sdpa function computes it."""
    from nb_finetune import attention
    calls = []
    apply = attention._ShortAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention._ShortAttention, "apply", lambda *a: calls.append(1) or apply(*a))
        query, key, value, _ = _attention_inputs(attention.SHORT_ROWS + 8)
        attention.attention_forward(_Module(), query, key, value, None, scaling=0.125)
        query, key, value, _ = _attention_inputs(64)
        with torch.no_grad():
            attention.attention_forward(_Module(), query, key, value, None, scaling=0.125)
        assert not calls
        attention.attention_forward(_Module(), query, key, value, None, scaling=0.125)
        assert calls


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", pytest.param("bfloat16", marks=needs_fast_bf16)])
def test_short_row_attention_in_training_keeps_the_loss_and_gradients(smollm2_dir, tokenizer, sst2_frame, precision):
    """SmolLM2-135M with LoRA on real SST-2 rows (padded, under 160 tokens): with the short-row
    attention the loss is sdpa's, and the adapter gradients differ from sdpa's by much less
    than bf16 autocast itself moves them from fp32 (the kernel alone is nearer float64 than
    sdpa's, test above), or in fp32 by float rounding; the model is on sdpa again afterwards."""
    from nb_finetune import attention
    frame = data.normalize(sst2_frame.iloc[:8], config.DataConfig(task="classification",
                                                                 label_names={"0": "negative", "1": "positive"}))
    rows, _ = tokenize_frame(frame, Formatter.build(tokenizer, "classification", ["negative", "positive"], 256))
    batch = CompletionOnlyCollator(tokenizer.pad_token_id, 8)([rows[i] for i in range(len(rows))])
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] <= attention.SHORT_ROWS
    mcfg = config.ModelConfig(lora_dropout=0.0)
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.train()

    def loss_and_grads(short: bool, autocast: bool = True):
        model.zero_grad()
        with attention.for_training(model) if short else torch.enable_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            used = model.config._attn_implementation
            loss = model(**batch).loss
        loss.backward()
        return used, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    bf16 = precision == "bfloat16"
    used_before, own_loss, own = loss_and_grads(False, autocast=bf16)
    used, loss, grads = loss_and_grads(True, autocast=bf16)
    assert (used_before, used) == ("sdpa", attention.NAME) and model.config._attn_implementation == "sdpa"
    if bf16:
        _, _, exact = loss_and_grads(False, autocast=False)
        assert loss == own_loss
        assert float((grads - own).norm()) < 0.5 * float((own - exact).norm())
    else:
        assert loss == pytest.approx(own_loss, rel=1e-5)
        assert float((grads - own).norm()) < 1e-4 * float(own.norm())


def test_fused_adamw_is_the_default_and_updates_as_the_multi_tensor_one():
    """Without a quantized base on a GPU the engine asks for torch's fused AdamW, whose updates
    on adapter-shaped tensors (LoRA A and B of SmolLM2's projections) are the multi-tensor
    AdamW's to float rounding."""
    assert engine.optimizer_and_checkpointing(config.TrainConfig(), quantized=False) == ("adamw_torch_fused", False)
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
