"""The base model's results, kept: reused for an equal key, computed again for another, computed
with the adapter switched off; and a second evaluation in a session reusing the base's scores."""
from contextlib import contextmanager

import pandas as pd

from nb_finetune import RunConfig
from nb_finetune.evaluation import BaseResults
from nb_finetune.pipeline import Session


class FakeAdapterModel:
    """Records whether its adapter is switched off, as a peft model's disable_adapter does."""

    def __init__(self):
        self.adapter_on = True

    @contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True


def test_a_result_is_reused_for_an_equal_key_and_computed_again_for_another():
    model, results, calls, said = FakeAdapterModel(), BaseResults(), [], []

    def compute():
        calls.append(model.adapter_on)
        return object()

    first = results.on_base(model, ("scores", 3), compute, said.append, "test scores")
    assert calls == [False] and model.adapter_on  # computed on the base, the adapter back on after
    assert not results.reused and said == []
    again = results.on_base(model, ("scores", 1 + 2), compute, said.append, "test scores")  # equal, not the same
    assert again is first and calls == [False] and results.reused
    assert said == ["the base model's test scores: from an earlier run (training does not change the base)"]
    other = results.on_base(model, ("scores", 4), compute, said.append, "test scores")
    assert other is not first and len(calls) == 2 and not results.reused and len(said) == 1
    assert results.on_base(model, None, compute) is not results.on_base(model, None, compute)  # None: never kept
    assert len(calls) == 4 and None not in results


def test_the_least_recently_used_results_go_past_the_limit():
    model, results = FakeAdapterModel(), BaseResults(limit=2)
    for key in ("a", "b"):
        results.on_base(model, key, lambda key=key: key)
    results.on_base(model, "a", lambda: "computed again")  # used now: "b" is the least recently used
    results.on_base(model, "c", lambda: "c")
    assert "a" in results and "c" in results and "b" not in results
    assert results.on_base(model, "a", lambda: "computed again") == "a"


def test_evaluating_twice_in_a_session_reuses_the_base_models_scores(tiny_model_dir, tmp_path, sst2_frame):
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_length": 64},
        "eval": {"num_samples": 1, "max_new_tokens": 4}})
    said = []
    s = Session(cfg, progress=said.append)
    s.prepare_data(sst2_frame)
    first = s.evaluate()
    assert not any("from an earlier run" in m for m in said)
    said.clear()
    again = s.evaluate()
    reused = [m for m in said if "from an earlier run" in m]
    assert reused == [f"the base model's {what}: from an earlier run (training does not change the base)"
                      for what in ("test scores", "samples")]
    assert not any("evaluating the base model" in m for m in said)  # the tuned model ran again, the base did not
    assert any("evaluating the tuned model" in m for m in said)
    pd.testing.assert_series_equal(first.metrics.loc["base"], again.metrics.loc["base"])
    assert list(first.samples["base"]) == list(again.samples["base"])
