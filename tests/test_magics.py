"""`%load_ext nb_finetune` through IPython's InteractiveShell: the magics, the config cell,
the text fallbacks of a terminal, and the rich display of the engine's objects."""
from __future__ import annotations

import pytest
import yaml
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nb_finetune")
    yield shell
    shell.run_line_magic("unload_ext", "nb_finetune")


def magics(shell):
    return shell.magics_manager.registry["FinetuneMagics"]


@pytest.fixture
def tiny_yaml(tiny_model_dir, shared_data, tmp_path) -> str:
    return yaml.safe_dump({
        "data": {"source": str(shared_data / "sst2" / "dev.tsv"), "text_column": "sentence", "max_rows": 120,
                 "label_names": {"0": "negative", "1": "positive"}},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "eval_steps": 2,
                  "logging_steps": 1, "max_length": 64},
        "eval": {"num_samples": 1, "max_new_tokens": 2}})


def test_load_unload_and_reload(ip):
    assert "finetune" in ip.magics_manager.magics["line"]
    assert "finetune_config" in ip.magics_manager.magics["cell"]
    ip.run_line_magic("unload_ext", "nb_finetune")
    assert "finetune" not in ip.magics_manager.magics["line"]
    ip.run_line_magic("load_ext", "nb_finetune")
    ip.run_line_magic("reload_ext", "nb_finetune")
    assert "finetune" in ip.magics_manager.magics["line"]


def test_a_bad_subcommand_lists_the_valid_ones(ip):
    with pytest.raises(UsageError) as err:
        ip.run_line_magic("finetune", "trian")
    text = str(err.value)
    assert "unknown subcommand 'trian'" in text
    for name in ("studio", "data", "preview", "train", "assets", "env"):
        assert f"  {name}" in text


def test_env_says_what_was_found_and_what_it_means(ip):
    table = ip.run_line_magic("finetune", "env")
    rows = {r[0]: r for r in table.rows}
    assert rows["front end"][1] == "IPython terminal" and "text" in rows["front end"][2]
    import ipywidgets
    assert rows["ipywidgets"][1] == ipywidgets.__version__
    for key in ("bf16", "bitsandbytes", "asset cache"):
        assert key in rows
    assert "<table" in table._repr_html_() and "front end" in str(table)


def test_assets_lists_the_builtins(ip):
    frame = ip.run_line_magic("finetune", "assets")
    assert {"smollm2-135m-instruct", "minilm-l6", "imdb-sample"} <= set(frame["name"])


def test_config_cell_with_errors_marks_each_field_and_changes_nothing(ip, capsys):
    before = ip.run_line_magic("finetune", "config")
    cell = "data:\n  task: sorting\nmodel:\n  lora_r: 0\ntrain:\n  learning_rate: fast\n  epochs: 2\n"
    result = ip.run_cell(f"%%finetune_config\n{cell}")
    assert isinstance(result.error_in_exec, UsageError) and "3 problems" in str(result.error_in_exec)
    shown = capsys.readouterr().out
    lines = {line.split("<--")[0].strip(): line for line in shown.splitlines()}
    assert "<--" in lines["task: sorting"] and "classification" in lines["task: sorting"]
    assert "<--" in lines["lora_r: 0"] and "<--" in lines["learning_rate: fast"]
    assert "<--" not in lines["epochs: 2"]
    assert ip.run_line_magic("finetune", "config") == before


def test_config_cell_becomes_the_settings_the_panels_show(ip):
    magics(ip).widgets = True  # as in a notebook
    panel = ip.run_line_magic("finetune", "model")
    lora = next(f for f in panel.forms if "model.lora_r" in f.controls)
    assert lora.controls["model.lora_r"].value == 16
    cfg = ip.run_cell_magic("finetune_config", "", "model:\n  lora_r: 8\ntrain:\n  max_length: 128\n")
    assert cfg.model.lora_r == 8
    assert lora.controls["model.lora_r"].value == 8  # the panel already shown follows
    studio = ip.run_line_magic("finetune", "studio")
    assert studio.shared is magics(ip).shared and studio.shared.config().train.max_length == 128
    assert type(ip.run_line_magic("finetune", "preview")).__name__ == "TokenizationPanel"


def test_terminal_fallbacks_answer_in_text(ip, tiny_yaml, tmp_path):
    magics(ip).widgets = False
    config = tmp_path / "run.yaml"
    config.write_text(tiny_yaml)
    report = ip.run_line_magic("finetune", f"data {yaml.safe_load(tiny_yaml)['data']['source']}")
    assert type(report).__name__ == "DataReport"
    session = ip.run_line_magic("finetune", f"train --config {config}")
    text = ip.display_formatter.format(session)[0]["text/plain"]
    assert "done: data, tokens, model, training, evaluation" in text
    assert session.train_result.global_step == 4 and session.eval_result is not None
    table = ip.run_line_magic("finetune", "runs")  # the folder the run went in
    assert table["run"].tolist() == ["run"] and table["status"].tolist() == ["finished"]
    assert table["steps"].tolist() == [4]
    with pytest.raises(UsageError, match="nb-finetune export"):
        ip.run_line_magic("finetune", "export")


def test_rich_display_of_configs_reports_results_and_sessions(ip, tiny_yaml, tmp_path):
    from nb_finetune import pipeline, training
    from nb_finetune.config import RunConfig
    cfg = RunConfig.from_dict(yaml.safe_load(tiny_yaml))
    fmt = ip.display_formatter.format
    html, text = fmt(cfg)[0]["text/html"], fmt(cfg)[0]["text/plain"]
    assert "<table" in html and "<td style='font-weight:bold'>4</td>" in html  # lora_r differs from 16
    assert "lora_r: 4" in text
    session = pipeline.run(cfg, callbacks=[training.Callback()], progress=lambda m: None)
    report = fmt(session.prep.report)[0]
    assert "data:image/png;base64" in report["text/html"] and "split" in report["text/plain"]
    # The length histogram marks the max_length the rows were cut to, not the longest row.
    from nb_finetune.render import figures
    roomy = pipeline.Session(cfg.with_overrides({"train.max_length": 256}), progress=lambda m: None)
    roomy.prepare_data()
    roomy.tokenize()
    assert roomy.prep.report.max_length == 256 > roomy.prep.report.token_lengths.max()
    drawn, real = [], figures.token_length_figure
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "token_length_figure", lambda lengths, limit: drawn.append(limit) or real(lengths, limit))
        fmt(roomy.prep.report)
    assert drawn == [256]
    legend = real(roomy.prep.report.token_lengths, 256).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["max_length 256"]
    trained = fmt(session.train_result)[0]
    assert "data:image/png;base64" in trained["text/html"] and "diagnosis" in trained["text/html"]
    assert "finished at step 4" in trained["text/plain"]
    evaluated = fmt(session.eval_result)[0]
    assert "tuned" in evaluated["text/html"] and "majority class" in evaluated["text/plain"]
    assert "evaluation" in fmt(session)[0]["text/html"]


def test_each_panel_subcommand_shows_its_panel(ip):
    magics(ip).widgets = True
    expected = {"studio": "Studio", "data": "DataPanel", "preview": "TokenizationPanel", "model": "ModelPanel",
                "train": "TrainPanel", "evaluate": "EvalPanel", "probe": "ProbePanel", "export": "ExportPanel",
                "runs": "RunsPanel"}
    for command, name in expected.items():
        shown = ip.run_line_magic("finetune", command)
        assert type(shown).__name__ == name
        assert shown.shared is magics(ip).shared  # one session behind every panel


def test_probe_in_a_terminal_reports_base_vs_tuned(ip, tiny_yaml, tmp_path):
    from nb_finetune.config import RunConfig
    magics(ip).widgets = False
    magics(ip).shared.use(RunConfig.from_dict(yaml.safe_load(tiny_yaml)))
    change = ip.run_line_magic("finetune", "probe 10")
    assert change.loc["all", ("base", "stereotype_preferred")] == change.loc["all", ("tuned", "stereotype_preferred")]
    assert change.loc["all", ("change", "mean_difference")] == 0  # nothing trained: the adapter is zero
    with pytest.raises(UsageError, match="how many pairs"):
        ip.run_line_magic("finetune", "probe many")


def test_probe_gate_checks_the_configs_probes_against_their_thresholds(ip, tiny_yaml):
    from nb_finetune.config import RunConfig
    magics(ip).widgets = False
    cfg = yaml.safe_load(tiny_yaml) | {"probe": {"probes": ["counterfactual"], "max_gap_increase": 0.05}}
    magics(ip).shared.use(RunConfig.from_dict(cfg))
    result = ip.run_line_magic("finetune", "probe gate")
    (check,) = result.checks
    assert check.probe == "counterfactual" and check.threshold == 0.05 and check.items == 10
    assert check.change == pytest.approx(0, abs=1e-5) and not result.failed  # nothing trained: no change
    assert result.summary().startswith("bias gate passed")


def test_probe_results_display_as_tables_and_text(tiny_model_dir):
    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nb_finetune.probes.completions import Draws, probe_completions, template_prompts
    from nb_finetune.probes.likelihood import probe_pairs
    from nb_finetune.probes.pairs import PairSet
    from nb_finetune.probes.scorers import WordListScorer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = PairSet("two", pd.DataFrame({"more": ["He is a nurse.", "She is strong."],
                                          "less": ["She is a nurse.", "He is strong."], "bias_type": "gender"}))
    fmt = InteractiveShell.instance().display_formatter.format
    shown = fmt(probe_pairs(model, tok, pairs, progress=lambda m: None))[0]
    assert "<table" in shown["text/html"] and "stereotype_preferred" in shown["text/plain"]
    prompts = template_prompts(["The {group} is"], ["woman", "man"])
    result = probe_completions(model, tok, prompts, WordListScorer(["the"]), Draws(samples=1, max_new_tokens=3),
                               progress=lambda m: None)
    shown = fmt(result)[0]
    assert "gap" in shown["text/html"] and "gap" in shown["text/plain"] and "woman" in shown["text/plain"]
