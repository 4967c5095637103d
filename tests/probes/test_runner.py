"""The one probe runner behind the panel and the magics: base (adapter off) against tuned,
the base's result kept in the shared cache and reused while the base and the inputs stay."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from nb_finetune.evaluation import BaseResults, as_base
from nb_finetune.probes import runner
from nb_finetune.probes.likelihood import pair_change, probe_pairs
from nb_finetune.probes.pairs import PairSet


def quiet(message):
    pass


@pytest.fixture
def tiny_lora(tiny_model_dir):
    """The tiny llama with a LoRA adapter that is not zero, so tuned differs from base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.eval(), tok


def two_pairs(name: str = "two") -> PairSet:
    return PairSet(name, pd.DataFrame({"more": ["He is a nurse.", "She is strong."],
                                       "less": ["She is a nurse.", "He is strong."], "bias_type": "gender"}))


def test_before_and_after_uses_the_adapter_switch(tiny_lora):
    model, tok = tiny_lora
    pairs = two_pairs()
    runs = runner.before_after(lambda m: probe_pairs(m, tok, pairs, progress=quiet), runner.ProbeTarget(model, tok))
    assert not np.allclose(runs["base"].scores["more_logprob"], runs["tuned"].scores["more_logprob"])
    change = pair_change(runs["base"], runs["tuned"])
    assert change.loc["all", ("change", "mean_difference")] == pytest.approx(
        runs["tuned"].summary.loc["all", "mean_difference"] - runs["base"].summary.loc["all", "mean_difference"])


def test_pair_probe_reuses_the_base_and_recomputes_the_tuned_model(tiny_lora, monkeypatch):
    """Probe, 'train' (change the adapter), probe again: the base's result is the kept one, and
    still what the base scores; the tuned model is scored again and shows the change."""
    model, tok = tiny_lora
    pairs, identity, cache = two_pairs(), ("tiny", "float32"), BaseResults()
    probed = []
    monkeypatch.setattr(runner, "probe_pairs", lambda *a, **k: probed.append(1) or probe_pairs(*a, **k))
    first = runner.pair_probe(runner.ProbeTarget(model, tok, base_results=cache, base_identity=identity), pairs,
                               progress=quiet)
    assert not cache.reused and len(probed) == 2 and len(cache.results) == 1
    with torch.no_grad():  # what training does to the base: nothing; to the adapter: a change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    second = runner.pair_probe(runner.ProbeTarget(model, tok, base_results=cache, base_identity=identity), pairs,
                                progress=quiet)
    assert cache.reused is True and len(probed) == 3  # the tuned model only
    assert second["base"] is first["base"]
    assert second["tuned"] is not first["tuned"]
    assert not np.allclose(second["tuned"].scores["more_logprob"], first["tuned"].scores["more_logprob"])
    with as_base(model):  # the kept result is still the base's
        fresh = probe_pairs(model, tok, pairs, progress=quiet)
    assert np.allclose(fresh.scores["more_logprob"], second["base"].scores["more_logprob"])

    # Other inputs, another seed or another base: probed again, each kept beside the first.
    for other in ({"pairs": two_pairs("other")}, {"seed": 1}, {"base_identity": ("tiny", "bfloat16")}):
        args = {"pairs": pairs, "base_identity": identity, "seed": 0} | other
        target = runner.ProbeTarget(model, tok, base_results=cache, base_identity=args["base_identity"])
        again = runner.pair_probe(target, args["pairs"], args["seed"], progress=quiet)
        assert not cache.reused and again["base"] is not first["base"]
    assert len(cache.results) == 4
    # Without an identity nothing is kept.
    runner.pair_probe(runner.ProbeTarget(model, tok, base_results=cache), pairs, progress=quiet)
    assert not cache.reused and len(cache.results) == 4


def test_completion_probe_never_keeps_the_base_of_your_classifier(tiny_lora):
    model, tok = tiny_lora
    prompts = pd.DataFrame({"group": ["woman", "man"], "template": "The {group} is",
                            "prompt": ["The woman is", "The man is"]})
    cache, identity = BaseResults(), ("tiny",)
    words = runner.scorer_for("word list", ["the"])
    mine = runner.scorer_for("your classifier", [], classifier=lambda texts: [len(t) for t in texts])
    target = runner.ProbeTarget(model, tok, base_results=cache, base_identity=identity)
    for _ in range(2):
        runner.completion_probe(target, prompts, mine, samples=1, progress=quiet)
        assert not cache.reused
    assert len(cache.results) == 0
    runner.completion_probe(target, prompts, words, samples=1, progress=quiet)
    results, blocked = runner.completion_probe(target, prompts, words, samples=1, progress=quiet, blocked=["the"])
    assert cache.reused and len(cache.results) == 1
    assert set(results) == {"base", "tuned", "tuned + word filter"} and set(blocked) <= {"the"}


def test_the_change_has_a_paired_bootstrap_interval_matching_a_plain_recount(tiny_lora, shared_data):
    from nb_finetune.probes.pairs import crows_pairs
    model, tok = tiny_lora
    items = crows_pairs(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv").items
    pairs = PairSet("crows-30", items.sample(n=30, random_state=1).reset_index(drop=True))
    runs = runner.before_after(lambda m: probe_pairs(m, tok, pairs, progress=quiet), runner.ProbeTarget(model, tok))
    change = pair_change(runs["base"], runs["tuned"], seed=0)
    # The same 400 resamples of the 30 pairs, counted with a plain loop.
    base, tuned = (runs[k].scores["prefers_more"].to_numpy(float) for k in ("base", "tuned"))
    draws = np.random.default_rng(0).integers(0, 30, size=(400, 30))
    low, high = np.percentile([tuned[i].mean() - base[i].mean() for i in draws], [2.5, 97.5])
    row = change.loc["all", "change"]
    assert row["stereotype_preferred_low"] == pytest.approx(low) and row["stereotype_preferred_high"] == pytest.approx(high)
    assert row["stereotype_preferred"] == pytest.approx(tuned.mean() - base.mean())
    same = pair_change(runs["base"], runs["base"])  # no change: an interval of width 0
    assert (same[("change", "stereotype_preferred_low")] == 0).all() and ("change", "icat") not in same.columns
    assert set(same.index) == {"all"} | set(pairs.items["bias_type"])
