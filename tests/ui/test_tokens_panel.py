"""The tokens panel: one row's tokens coloured by role, the batches' padding and truncation,
following max_length, packing and the token cache as they change."""
from __future__ import annotations

import re

import pytest


def test_tokens_panel_switches_the_token_cache(ui_config):
    from nb_finetune.ui import TokenizationPanel
    panel = TokenizationPanel(config=ui_config)
    box = panel.forms[0].controls["train.cache_tokens"]
    assert box.value is True and panel.shared.config().train.cache_tokens is True
    box.value = False
    assert panel.shared.config().train.cache_tokens is False


def test_token_preview_colours_the_trained_tokens_and_follows_max_length(ui_config, sst2_120):
    from nb_finetune.data.collator import token_table
    from nb_finetune.data.formatter import IGNORE
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
    """The padding share the panel shows is what the collator really adds."""
    from nb_finetune.config import DataConfig
    from nb_finetune.data import normalize
    from nb_finetune.data.collator import CompletionOnlyCollator, batch_padding
    from nb_finetune.data.formatter import Formatter
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
