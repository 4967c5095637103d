"""The data panel: a source loaded and checked, its report, plots and split; a bad source
shown in the panel; the data-side mitigation settings."""
from __future__ import annotations

PNG = b"\x89PNG"


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
