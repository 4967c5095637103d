"""The data panel: a source loaded and checked, its report, plots and split; a bad source
shown in the panel; the data-side mitigation settings."""
from __future__ import annotations

from conftest import PNG


def test_data_panel_loads_a_frame_and_shows_report_plots_and_split(ui_config, sst2_120):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=ui_config, data=sst2_120)
    # the box names the frame used, not the data.source it stands in for (which stays as set)
    assert panel.source.disabled and panel.source.value == "DataFrame (120 rows)"
    assert "sentence, label" in panel.source_note.value and panel.shared.get("data.source") == "imdb-sample"
    pictures = (panel.balance_image, panel.length_image)
    assert not any(p.shown for p in pictures) and "class balance appears here" in panel.balance_image.hint.value
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    prep = panel.shared.current.prep
    sizes = prep.report.split_sizes
    assert sum(sizes.values()) == len(sst2_120.drop_duplicates())
    for name, n in sizes.items():
        assert f"{name} {n:,}" in panel.splits.value
    assert "exact duplicates" in panel.report.value and "classes" in panel.report.value
    assert panel.balance_image.value.startswith(PNG) and panel.length_image.value.startswith(PNG)
    for picture in pictures:  # each at its own pixel size, in a row that does not stretch it
        assert picture.shown and picture.image.width == str(int.from_bytes(picture.value[16:20], "big"))
    row = next(w for w in panel.children if pictures[0] in getattr(w, "children", ()))
    assert row.layout.align_items == "flex-start" and pictures[0].layout.align_items == "flex-start"
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


def test_data_report_notes_removed_prompt_middles_only_when_some_were(ui_config, sst2_120):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=ui_config, data=sst2_120)
    for max_length in (256, 24):
        panel.shared.set("train.max_length", max_length)
        panel.load_button.click()
        assert panel.error.value == "", panel.error.value
        cut = panel.shared.current.token_stats["train"].prompt_truncated
        assert cut == 0 if max_length == 256 else cut > 0
        assert ("middle of the prompt removed" in panel.report.value) == (cut > 0), max_length


def test_data_panel_shows_the_bias_scan_and_its_fix_scans_again(ui_config, shared_data):
    from conftest import mentions, sst2_dev

    from nb_finetune.data.bias_scan import DEFAULT_GROUPS
    from nb_finetune.ui import DataPanel
    frame = sst2_dev(shared_data)
    female = mentions(frame["sentence"], DEFAULT_GROUPS["gender"]["female"])
    frame.loc[female, "label"] = "0"  # a planted skew: every row about women negative
    panel = DataPanel(config=ui_config, data=frame)
    buttons = (panel.counterfactual_button, panel.reweight_button)
    assert not panel.scan_image.shown and "bias scan" in panel.scan_text.value and all(b.disabled for b in buttons)
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    assert "differ: female" in panel.scan_text.value and panel.scan_image.value.startswith(PNG)
    assert "most skewed terms" in panel.scan_terms.value and "bias scan: groups whose" in panel.report.value
    assert not any(b.disabled for b in buttons)
    panel.reweight_button.click()  # group sizes balanced: the label shares, and so the flag, stay
    assert panel.error.value == "", panel.error.value
    assert set(panel.shared.get("data.reweight_groups")) == {"female", "male"}
    assert "rows drawn again to balance groups" in panel.report.value and "differ: female" in panel.scan_text.value
    panel.counterfactual_button.click()
    assert panel.error.value == "", panel.error.value
    assert panel.shared.get("data.counterfactual") and panel.forms[3].controls["data.counterfactual"].value
    assert "none differs" in panel.scan_text.value and "before mitigation: 1 differed" in panel.scan_text.value
    assert [b.disabled for b in buttons] == [True, True]
