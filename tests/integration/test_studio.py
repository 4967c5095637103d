"""The studio end to end: train, the evaluation that follows by itself, a prompt of your own,
and the export of the adapter, a merged model, a GGUF checked by a round trip, a job folder and a
config that runs again."""
from __future__ import annotations

from pathlib import Path

from conftest import PNG


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
    assert ev.confusion.value.startswith(PNG) and ev.confusion.shown and "samples" in ev.samples.value
    # the instruction every text followed is said once, above the tables, not in each row
    instruction = studio.shared.current.formatter.instruction
    assert instruction and ev.instruction.value.count(instruction) == 1
    assert instruction not in ev.samples.value and instruction not in ev.errors.value
    assert studio.tabs.selected_index == studio.panels.index(ev)
    ev.prompt.value = "a wonderful, moving film"
    ev.generate_button.click()
    assert ev.error.value == "" and "wonderful" in ev.generated.value
    # The playground streams both answers, on a thread here and in the foreground as on Colab.
    ev.message.value, ev.temperature.value, ev.max_new.value = "Say something kind.", 0.0, 16
    ev.chat().join(120)
    assert ev.error.value == "" and ev.send_button.disabled is False and ev.stop_chat.disabled is True
    streamed = {name: box.value for name, box in ev.answers.items()}
    assert streamed["base"].startswith("<b>base</b><br>") and streamed["tuned"].startswith("<b>tuned</b><br>")
    ev.foreground = True
    ev.answers["tuned"].value = ""
    assert ev.chat() is None and ev.answers["tuned"].value == streamed["tuned"]  # greedy: the same answer

    exp = studio.export
    exp.folder.value = str(tmp_path / "export")
    exp.merged.value = True
    exp.gguf.value = "f16"
    exp.export_button.click()
    assert exp.error.value == "", exp.error.value
    out = tmp_path / "export"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert list((out / "merged").glob("*.safetensors")) and (out / "job" / "launch_torchrun.sh").is_file()
    assert (out / "gguf-f16" / "model.gguf").is_file() and (out / "gguf-f16" / "Modelfile").is_file()
    assert "round trip (f16" in exp.status.value and "FAILED" not in exp.status.value
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


def test_written_paths_are_shown_as_the_folder_box_names_them(tmp_path, monkeypatch):
    """The export writes the GGUF under a resolved path; the list names it from the notebook's
    folder, as the folder box and the other written paths do."""
    from nb_finetune.ui.export_panel import shown
    monkeypatch.chdir(tmp_path)
    assert shown(tmp_path / "runs" / "dpo" / "export" / "gguf-f16" / "model.gguf") == "runs/dpo/export/gguf-f16/model.gguf"
    assert shown(Path("runs/dpo/export/config.yaml")) == "runs/dpo/export/config.yaml"
    assert shown(Path("/elsewhere/model.gguf")) == "/elsewhere/model.gguf"
