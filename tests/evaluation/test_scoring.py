"""Evaluation numbers recomputed independently with plain transformers / numpy."""
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from nb_finetune.data.collator import CompletionOnlyCollator
from nb_finetune.data.formatter import Formatter
from nb_finetune.evaluation import as_base
from nb_finetune.evaluation.scoring import classification_metrics, score_labels, shared_length


def test_classification_metrics_by_hand():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "a", "b", "c", "c"]
    metrics, confusion = classification_metrics(truth, pred, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: a 2*2/(4+0+1)=0.8, b 2*1/(2+1+1)=0.5, c 2*1/(2+1+0)=2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert confusion.loc["a", "b"] == 1 and confusion.loc["b", "c"] == 1 and confusion.to_numpy().sum() == 6


@pytest.mark.parametrize("shared_prompt", [True, False], ids=["prompt-once", "whole-sequences"])
def test_label_scores_match_plain_transformers(shared_prompt, tiny_model_dir, tokenizer, sst2_frame):
    """The score of a label = sum of log p(label tokens + end-of-turn | prompt), one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    labels = ["negative", "positive"]
    frame = pd.DataFrame({"text": sst2_frame["sentence"].head(6), "label": "negative"})
    fmt = Formatter.build(tokenizer, "classification", labels, max_length=128)
    ours = score_labels(model, fmt, frame, labels, CompletionOnlyCollator(tokenizer.pad_token_id), batch_size=4,
                        shared_prompt=shared_prompt)
    for i, text in enumerate(frame["text"]):
        for j, lab in enumerate(labels):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{fmt.instruction}\n\n{text}"}], tokenize=False,
                add_generation_prompt=True)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(lab + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + r_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = sum(logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(r_ids))
            assert ours[i, j] == pytest.approx(want, abs=1e-3)


def test_prompt_once_scores_equal_whole_sequences_with_an_adapter_on_and_off(tiny_model_dir, tokenizer, sst2_frame):
    """A llama with a LoRA adapter that changes its outputs: labels of different token lengths,
    prompts cut to max_length (so some labels keep different prompt tokens), rows of different
    lengths in one batch; the adapter on (tuned) and switched off (base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    labels = ["bad", "very good indeed", "mixed"]
    frame = pd.DataFrame({"text": sst2_frame["sentence"].head(20), "label": "bad"})
    fmt = Formatter.build(tokenizer, "classification", labels, max_length=72)  # cuts 7 of the 20
    collator = CompletionOnlyCollator(tokenizer.pad_token_id)
    features = fmt.encode_many([r | {"label": lab} for r in frame.to_dict("records") for lab in labels])
    per_row = [features[i:i + 3] for i in range(0, len(features), 3)]
    first_trained = [min(f["labels"].index(next(x for x in f["labels"] if x != -100)) for f in feats)
                     for feats in per_row]
    assert any(shared_length(feats) < t - 1 for feats, t in zip(per_row, first_trained))  # a cut prompt
    assert len({shared_length(feats) for feats in per_row}) > 3  # rows of many lengths
    results = {}
    for adapter in ("on", "off"):
        with as_base(model) if adapter == "off" else torch.no_grad():
            whole = score_labels(model, fmt, frame, labels, collator, batch_size=8, shared_prompt=False)
            once = score_labels(model, fmt, frame, labels, collator, batch_size=8, shared_prompt=True)
        assert once == pytest.approx(whole, abs=1e-3)
        assert (once.argmax(1) == whole.argmax(1)).all()
        results[adapter] = once
    assert abs(results["on"] - results["off"]).max() > 0.1  # the adapter is really in the scores
