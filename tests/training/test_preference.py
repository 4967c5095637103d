"""Preference losses (training.preference) on a tiny random llama with LoRA and real SmolLM2
token ids: DPO's loss and gradients against TRL's DPOTrainer on the same batch and weights
(with and without the CPU kernels' fused projection), ORPO's odds-ratio term against TRL's
ORPOTrainer, the reference by adapter-off against the base model loaded alone, and the
closed forms."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from nb_finetune.data.collator import PairCollator
from nb_finetune.data.formatter import IGNORE
from nb_finetune.kernels.loss import FusedCausalLMLoss
from nb_finetune.training.preference import (
    PreferenceLoss,
    dpo_losses,
    orpo_odds_term,
    reference_log_probs,
    token_log_probs,
)


def trl_1():
    """TRL, the reference (the test extra pins trl>=1.16, whose trainers import under
    transformers 5); skipped only where it is not installed, as on Python 3.10."""
    return pytest.importorskip("trl", minversion="1.16")


def lora_model(tiny_model_dir, seed: int = 0):
    """The tiny llama with a LoRA adapter of zero B (as peft starts it), in float32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def move_adapter(model, seed: int = 1) -> None:
    """Give the adapter weights of its own, so the tuned model differs from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture
def pairs(tokenizer):
    """Three pairs of real text as (prompt ids, chosen ids, rejected ids), answers ending in EOS."""
    texts = [("Review: the film was", " a delight from start to finish", " dull"),
             ("Say something kind about your neighbour.", " She is always generous.", " He is lazy and loud."),
             ("Q: Who can be a good engineer?\nA:", " Anyone who practises.", " Only men.")]
    eos = tokenizer.eos_token_id
    return [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"] + [eos],
             tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]) for p, c, r in texts]


def our_batch(pairs, pad_id):
    def side(prompt, answer):
        return prompt + answer, [IGNORE] * len(prompt) + answer
    feats = []
    for prompt, chosen, rejected in pairs:
        (ci, cl), (ri, rl) = side(prompt, chosen), side(prompt, rejected)
        feats.append({"input_ids": ci, "labels": cl, "rejected_input_ids": ri, "rejected_labels": rl})
    return PairCollator(pad_id, None)(feats)


def trl_dpo_trainer(model, tokenizer, tmp_path, beta, loss_type):
    import datasets
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                     use_cpu=True)
    toy = datasets.Dataset.from_list([{"prompt": "hi", "chosen": " yes", "rejected": " no"}] * 2)
    return DPOTrainer(model=model, args=args, train_dataset=toy, processing_class=tokenizer)


def adapter_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type,fused", [("sigmoid", False), ("sigmoid", True), ("ipo", False)])
def test_dpo_loss_and_gradients_equal_trl(tiny_model_dir, tokenizer, pairs, tmp_path, loss_type, fused):
    trl_1()
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    model = lora_model(tiny_model_dir)
    trainer = trl_dpo_trainer(model, tokenizer, tmp_path, 0.3, loss_type)
    model = trainer.model  # TRL keeps the starting adapter (B = 0: the base) as its reference, "ref"
    move_adapter(model)
    model.train()
    theirs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    ours = our_batch(pairs, tokenizer.pad_token_id)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])  # the same rows, chosen then rejected

    trl_loss = trainer.compute_loss(model, theirs)
    trl_loss.backward()
    trl_grads = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    head = FusedCausalLMLoss.for_model(model, torch.float32) if fused else None
    assert (head is not None) == fused
    loss, metrics = PreferenceLoss("dpo", 0.3, loss_type)(model, ours, head)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) <= 1e-5
    assert abs(loss.item() - math.log(2)) > 1e-4  # the adapter moved the model: not the loss at the start
    grads = adapter_grads(model)
    assert grads.keys() == trl_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, trl_grads[name], atol=1e-4, rtol=0), name
    if loss_type == "sigmoid":
        logged = trainer._metrics["train"]
        assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"][-1], abs=1e-5)
        assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"][-1])


def test_orpo_odds_ratio_term_equals_trl(tiny_model_dir, tokenizer, pairs):
    trl_1()
    from trl.experimental.orpo import ORPOTrainer
    model = lora_model(tiny_model_dir)
    move_adapter(model)
    batch = our_batch(pairs, tokenizer.pad_token_id)
    token_logps, rows = token_log_probs(model, batch)
    sums = torch.zeros(6).index_add(0, rows, token_logps)
    counts = torch.zeros(6).index_add(0, rows, torch.ones_like(token_logps))
    means = sums / counts
    # TRL's own per-token mean log-probabilities from the full logits, for the same rows.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trl_means = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    assert torch.allclose(means, trl_means, atol=1e-5)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_losses = ORPOTrainer.odds_ratio_loss(fake, trl_means[:3], trl_means[3:])[0]
    ours = orpo_odds_term(means[:3], means[3:], 0.25)
    assert torch.allclose(ours, -trl_losses, atol=1e-5)  # TRL returns beta x log sigmoid, subtracted


def test_orpo_loss_is_the_answers_cross_entropy_plus_the_odds_term(tiny_model_dir, tokenizer, pairs):
    """The SFT part is the chosen answers' tokens' cross-entropy, as our SFT trains (TRL's ORPO
    also counts the prompt's tokens there: docs/preference.md)."""
    model = lora_model(tiny_model_dir)
    move_adapter(model)
    batch = our_batch(pairs, tokenizer.pad_token_id)
    loss, _ = PreferenceLoss("orpo", 0.25)(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:3, :-1].reshape(-1, logits.shape[-1]),
                                           batch["labels"][:3, 1:].reshape(-1), ignore_index=IGNORE)
    token_logps, rows = token_log_probs(model, batch)
    means = (torch.zeros(6).index_add(0, rows, token_logps)
             / torch.zeros(6).index_add(0, rows, torch.ones_like(token_logps)))
    assert loss.item() == pytest.approx((ce + orpo_odds_term(means[:3], means[3:], 0.25).mean()).item(), abs=1e-5)


def test_reference_by_adapter_off_equals_the_base_loaded_alone(tiny_model_dir, tokenizer, pairs):
    from transformers import AutoModelForCausalLM
    model = lora_model(tiny_model_dir)
    move_adapter(model)
    batch = our_batch(pairs, tokenizer.pad_token_id)
    reference = reference_log_probs(model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logps, rows = token_log_probs(base, batch)
    assert torch.allclose(reference.sums, torch.zeros(6).index_add(0, rows, logps), atol=1e-5)
    with torch.no_grad():
        tuned, _ = token_log_probs(model, batch)
    assert not torch.allclose(tuned, logps, atol=1e-3)  # the adapter is on again after the reference


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_the_fused_projection_gives_the_plain_loss_and_gradients(tiny_model_dir, tokenizer, pairs, method):
    """The CPU kernels' path (kernels.loss.linear_log_probs: no logits kept, no second pass over
    the vocabulary in the backward) against logits at the trained positions."""
    model = lora_model(tiny_model_dir)
    move_adapter(model)
    model.train()
    batch = our_batch(pairs, tokenizer.pad_token_id)
    results = []
    for fused in (None, FusedCausalLMLoss.for_model(model, torch.float32)):
        model.zero_grad(set_to_none=True)
        loss, _ = PreferenceLoss(method, 0.2)(model, batch, fused)
        loss.backward()
        results.append((loss.item(), adapter_grads(model)))
    (plain, plain_grads), (fused_loss, fused_grads) = results
    assert abs(plain - fused_loss) <= 1e-5
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-4, rtol=0), name


def test_dpo_closed_forms():
    c, r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    beta = 0.5
    sigmoid = dpo_losses(c, r, rc, rr, beta)
    # pair 1: ratios +1 and -1, margin 2 -> -log sigmoid(1); pair 2: 0 and +1 -> -log sigmoid(-0.5)
    assert sigmoid.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    ipo = dpo_losses(c, r, rc, rr, beta, "ipo", torch.tensor([2.0, 1.0]), torch.tensor([4.0, 1.0]))
    # per-token ratios: 1/2 - (-1/4) = 0.75 and 0 - 1 = -1; minus 1 / (2 beta) = 1, squared
    assert ipo.tolist() == pytest.approx([0.0625, 4.0])
    with pytest.raises(ValueError):
        dpo_losses(c, r, rc, rr, beta, "hinge")


def test_orpo_odds_term_closed_form():
    p_c, p_r = 0.5, 0.2
    term = orpo_odds_term(torch.tensor([math.log(p_c)]), torch.tensor([math.log(p_r)]), 1.0)
    odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))  # 4
    assert term.item() == pytest.approx(-math.log(odds_ratio / (1 + odds_ratio)))


@pytest.mark.slow
def test_smollm2_dpo_raises_held_out_preference_accuracy(shared_data, tmp_path):
    """SmolLM2-135M-Instruct, DPO (3 epochs) on 80 pairs built from real SST-2 sentences (the review and a
    question as the prompt, the right sentiment word chosen, the wrong one rejected): on 40
    held-out pairs the tuned model prefers the right word more often than the base, by a wider
    margin. (Pairs of two unrelated sentences would not show it: their summed log-probabilities
    differ by tens of nats, far more than a few DPO steps move, so accuracy on them barely
    changes while the reward accuracy rises.)"""
    from conftest import sst2_dev

    from nb_finetune import RunConfig, run
    dev = sst2_dev(shared_data)
    dev = dev[dev.sentence.str.len().between(40, 160)].sample(120, random_state=1)
    words = {"1": "positive", "0": "negative"}
    pairs = pd.DataFrame({"prompt": [f"Review: {s}\nIs this review positive or negative? Answer with one word."
                                     for s in dev.sentence],
                          "chosen": [words[label] for label in dev.label],
                          "rejected": [words["1" if label == "0" else "0"] for label in dev.label]})
    cfg = RunConfig.from_dict({
        "data": {"task": "preference", "val_fraction": 0.0, "test_fraction": 40 / 120},
        # Three epochs: in the first ten steps DPO moves the two words' prior (every answer
        # "negative") before it learns which word each review takes.
        "train": {"output_dir": str(tmp_path / "dpo"), "method": "dpo", "beta": 0.1, "epochs": 3,
                  "batch_size": 8, "learning_rate": 5e-4, "max_length": 96, "logging_steps": 2},
        "eval": {"num_samples": 1, "max_new_tokens": 12}})
    session = run(cfg, progress=lambda m: None, source=pairs)
    metrics = session.eval_result.metrics
    assert metrics.loc["tuned", "pairs"] == 40
    assert metrics.loc["tuned", "preference_accuracy"] > metrics.loc["base", "preference_accuracy"]
    assert metrics.loc["tuned", "mean_margin"] > metrics.loc["base", "mean_margin"]
    assert metrics.loc["tuned", "reward_accuracy"] > 0.5
    history = session.train_result.history
    assert history["reward_margin"].dropna().iloc[-1] > 0
