"""Evaluation numbers recomputed independently with plain transformers / numpy."""
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from nb_finetune.evaluation import classification_metrics, score_labels
from nb_finetune.tokenization import CompletionOnlyCollator, Formatter


def test_classification_metrics_by_hand():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "a", "b", "c", "c"]
    metrics, confusion = classification_metrics(truth, pred, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: a 2*2/(4+0+1)=0.8, b 2*1/(2+1+1)=0.5, c 2*1/(2+1+0)=2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert confusion.loc["a", "b"] == 1 and confusion.loc["b", "c"] == 1 and confusion.to_numpy().sum() == 6


def test_label_scores_match_plain_transformers(tiny_model_dir, tokenizer, sst2_frame):
    """The score of a label = sum of log p(label tokens + end-of-turn | prompt), one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    labels = ["negative", "positive"]
    frame = pd.DataFrame({"text": sst2_frame["sentence"].head(6), "label": "negative"})
    fmt = Formatter.build(tokenizer, "classification", labels, max_length=128)
    ours = score_labels(model, fmt, frame, labels, CompletionOnlyCollator(tokenizer.pad_token_id), batch_size=4)
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
