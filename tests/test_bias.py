"""Bias probes on real pair sets and the real SmolLM2, checked against an independent
computation with plain transformers; completion probes on a tiny model; bad inputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from nb_finetune import bias
from nb_finetune.errors import UserError


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


def test_crows_pairs_scores_agree_with_plain_transformers(smollm2, shared_data):
    model, tok = smollm2
    pairs = bias.crows_pairs(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    held_out = bias.PairSet("crows-sample", pairs.items.sample(n=24, random_state=7).reset_index(drop=True))
    result = bias.probe_pairs(model, tok, held_out, batch_size=8, progress=lambda m: None)
    for row in result.scores.itertuples():
        assert row.more_logprob == pytest.approx(plain_logprob(model, tok, row.more), abs=2e-3)
        assert row.less_logprob == pytest.approx(plain_logprob(model, tok, row.less), abs=2e-3)
    overall = result.summary.loc["all"]
    assert overall["pairs"] == 24
    assert overall["stereotype_preferred"] == pytest.approx((result.scores["difference"] > 0).mean())
    assert overall["stereotype_preferred_low"] <= overall["stereotype_preferred"] <= overall["stereotype_preferred_high"]
    assert set(result.summary.index) == {"all"} | set(held_out.items["bias_type"])


def test_stereoset_intersentence_scores_after_the_context_and_lms_ss_icat(smollm2):
    from nb_finetune import assets
    model, tok = smollm2
    items = bias.stereoset(assets.data_path("stereoset", progress=lambda m: None), "intersentence")
    held_out = bias.PairSet("stereoset-sample", items.items.sample(n=12, random_state=3).reset_index(drop=True))
    result = bias.probe_pairs(model, tok, held_out, batch_size=6, progress=lambda m: None)
    plain = np.array([[plain_logprob(model, tok, r[c], r["context"]) for c in ("more", "less", "unrelated")]
                      for r in held_out.items.to_dict("records")])
    assert np.allclose(result.scores[["more_logprob", "less_logprob", "unrelated_logprob"]], plain, atol=2e-3)
    lms = ((plain[:, 0] > plain[:, 2]).mean() + (plain[:, 1] > plain[:, 2]).mean()) * 50
    ss = (plain[:, 0] > plain[:, 1]).mean() * 100
    overall = result.summary.loc["all"]
    assert overall["lms"] == pytest.approx(lms) and overall["ss"] == pytest.approx(ss)
    assert overall["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)


def test_winobias_pairs_pro_and_anti_lines(shared_data):
    pairs = bias.winobias(shared_data / "winobias", "test")
    assert len(pairs.items) + pairs.dropped == 2 * 395
    first = pairs.items.iloc[0]
    assert "[" not in first["more"] and first["more"] != first["less"]
    assert set(pairs.items["bias_type"]) == {"gender (type1)", "gender (type2)"}


def test_completion_probe_scores_groups_reproducibly(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = bias.template_prompts(["The {group} worked as a", "The {group} was known for"], ["woman", "man"])
    scorer = bias.WordListScorer(["the", "a"])
    run = lambda: bias.probe_completions(model, tok, prompts, scorer, samples=2, max_new_tokens=6,  # noqa: E731
                                         seed=1, progress=lambda m: None)
    first, again = run(), run()
    assert list(first.completions["completion"]) == list(again.completions["completion"])
    assert len(first.completions) == 2 * 2 * 2
    flagged = [1.0 if scorer.pattern.search(c) else 0.0 for c in first.completions["completion"]]
    assert list(first.completions["score"]) == flagged
    means = first.completions.groupby("group")["score"].mean()
    assert first.by_group["mean"].to_dict() == pytest.approx(means.to_dict())
    assert first.gap["gap"] == pytest.approx(means.max() - means.min())


def test_vader_scores_sentiment_offline():
    scores = bias.VaderScorer()(["a wonderful, kind person", "a terrible, cruel person"])
    assert scores[0] > 0.3 and scores[1] < -0.3


def test_before_and_after_uses_the_adapter_switch(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pairs = bias.PairSet("two", pd.DataFrame({"more": ["He is a nurse.", "She is strong."],
                                               "less": ["She is a nurse.", "He is strong."], "bias_type": "gender"}))
    runs = bias.before_after(lambda m: bias.probe_pairs(m, tok, pairs, progress=lambda x: None), model)
    assert not np.allclose(runs["base"].scores["more_logprob"], runs["tuned"].scores["more_logprob"])
    change = bias.pair_change(runs["base"], runs["tuned"])
    assert change.loc["all", ("change", "mean_difference")] == pytest.approx(
        runs["tuned"].summary.loc["all", "mean_difference"] - runs["base"].summary.loc["all", "mean_difference"])


def test_bad_probe_inputs_get_clear_errors(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("sent_more,bias_type\na,gender\n")
    with pytest.raises(UserError, match="missing column.*sent_less"):
        bias.crows_pairs(bad)
    with pytest.raises(UserError, match="group list is empty"):
        bias.template_prompts(["The {group} is"], [])
    with pytest.raises(UserError, match="no \\{group\\} slot"):
        bias.template_prompts(["The person is"], ["a", "b"])
    with pytest.raises(UserError, match="word list is empty"):
        bias.WordListScorer([])


def test_bold_prompts_sample_each_group(shared_data):
    frame = bias.bold_prompts(shared_data / "bold" / "gender_prompt.json", per_group=5, seed=2)
    assert frame["group"].value_counts().to_dict() == {"American_actors": 5, "American_actresses": 5}
    assert frame.equals(bias.bold_prompts(shared_data / "bold" / "gender_prompt.json", per_group=5, seed=2))
    with pytest.raises(UserError, match="no group"):
        bias.bold_prompts(shared_data / "bold" / "gender_prompt.json", ["martians"])
