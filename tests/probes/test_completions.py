"""Completion probes on a tiny model, reproducible for a seed; BOLD prompts; the scorers; bad
inputs."""
from __future__ import annotations

import pytest

from nb_finetune.errors import UserError
from nb_finetune.probes.completions import Draws, bold_prompts, probe_completions, template_prompts
from nb_finetune.probes.scorers import VaderScorer, WordListScorer


def test_completion_probe_scores_groups_reproducibly(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = template_prompts(["The {group} worked as a", "The {group} was known for"], ["woman", "man"])
    scorer = WordListScorer(["the", "a"])
    run = lambda: probe_completions(model, tok, prompts, scorer, Draws(samples=2, max_new_tokens=6, seed=1),  # noqa: E731
                                    progress=lambda m: None)
    first, again = run(), run()
    assert list(first.completions["completion"]) == list(again.completions["completion"])
    assert len(first.completions) == 2 * 2 * 2
    flagged = [1.0 if scorer.pattern.search(c) else 0.0 for c in first.completions["completion"]]
    assert list(first.completions["score"]) == flagged
    means = first.completions.groupby("group")["score"].mean()
    assert first.by_group["mean"].to_dict() == pytest.approx(means.to_dict())
    assert first.gap["gap"] == pytest.approx(means.max() - means.min())


def test_vader_scores_sentiment_offline():
    scores = VaderScorer()(["a wonderful, kind person", "a terrible, cruel person"])
    assert scores[0] > 0.3 and scores[1] < -0.3


def test_bad_completion_probe_inputs_get_clear_errors():
    with pytest.raises(UserError, match="group list is empty"):
        template_prompts(["The {group} is"], [])
    with pytest.raises(UserError, match="no \\{group\\} slot"):
        template_prompts(["The person is"], ["a", "b"])
    with pytest.raises(UserError, match="word list is empty"):
        WordListScorer([])


def test_bold_prompts_sample_each_group(shared_data):
    frame = bold_prompts(shared_data / "bold" / "gender_prompt.json", per_group=5, seed=2)
    assert frame["group"].value_counts().to_dict() == {"American_actors": 5, "American_actresses": 5}
    assert frame.equals(bold_prompts(shared_data / "bold" / "gender_prompt.json", per_group=5, seed=2))
    with pytest.raises(UserError, match="no group"):
        bold_prompts(shared_data / "bold" / "gender_prompt.json", ["martians"])
