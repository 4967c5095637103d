"""Likelihood-pair probes on real pair sets and the real SmolLM2, checked against an
independent computation with plain transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nb_finetune.probes.likelihood import probe_pairs
from nb_finetune.probes.pairs import PairSet, crows_pairs, stereoset


def plain_logprob(model, tokenizer, sentence: str, context: str | None = None) -> float:
    """lm-evaluation-harness style, written out: log P(sentence | BOS [context])."""
    head = [tokenizer.bos_token_id] + (tokenizer(context, add_special_tokens=False)["input_ids"] if context else [])
    body = tokenizer((" " + sentence) if context else sentence, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + body])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(head) - 1 + i, t] for i, t in enumerate(body)))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow  # the real SmolLM2
def test_crows_pairs_scores_agree_with_plain_transformers(smollm2, shared_data):
    model, tok = smollm2
    pairs = crows_pairs(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    held_out = PairSet("crows-sample", pairs.items.sample(n=24, random_state=7).reset_index(drop=True))
    result = probe_pairs(model, tok, held_out, batch_size=8, progress=lambda m: None)
    for row in result.scores.itertuples():
        assert row.more_logprob == pytest.approx(plain_logprob(model, tok, row.more), abs=2e-3)
        assert row.less_logprob == pytest.approx(plain_logprob(model, tok, row.less), abs=2e-3)
    overall = result.summary.loc["all"]
    assert overall["pairs"] == 24
    assert overall["stereotype_preferred"] == pytest.approx((result.scores["difference"] > 0).mean())
    assert overall["stereotype_preferred_low"] <= overall["stereotype_preferred"] <= overall["stereotype_preferred_high"]
    assert overall["distance_from_ideal"] == pytest.approx(abs(overall["stereotype_preferred"] - 0.5))
    assert overall["distance_from_ideal_low"] <= overall["distance_from_ideal"] <= overall["distance_from_ideal_high"]
    assert set(result.summary.index) == {"all"} | set(held_out.items["bias_type"])


@pytest.mark.slow  # the real SmolLM2
def test_stereoset_intersentence_scores_after_the_context_and_lms_ss_icat(smollm2):
    from nb_finetune import assets
    model, tok = smollm2
    items = stereoset(assets.data_path("stereoset", progress=lambda m: None), "intersentence")
    held_out = PairSet("stereoset-sample", items.items.sample(n=12, random_state=3).reset_index(drop=True))
    result = probe_pairs(model, tok, held_out, batch_size=6, progress=lambda m: None)
    plain = np.array([[plain_logprob(model, tok, r[c], r["context"]) for c in ("more", "less", "unrelated")]
                      for r in held_out.items.to_dict("records")])
    assert np.allclose(result.scores[["more_logprob", "less_logprob", "unrelated_logprob"]], plain, atol=2e-3)
    lms = ((plain[:, 0] > plain[:, 2]).mean() + (plain[:, 1] > plain[:, 2]).mean()) * 50
    ss = (plain[:, 0] > plain[:, 1]).mean() * 100
    overall = result.summary.loc["all"]
    assert overall["lms"] == pytest.approx(lms) and overall["ss"] == pytest.approx(ss)
    assert overall["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
