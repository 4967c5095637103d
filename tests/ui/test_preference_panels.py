"""The panels on preference pairs (data.task preference, train.method dpo/orpo), on the tiny llama
and pairs of real SST-2 sentences: the Data panel's pair checks and length-bias figure, the Tokens
panel's pair view and pair-batch statistics, the Train panel's method controls and reward curves,
the Evaluate panel's tuned-against-base pairs and its playground, bad input as one line, and a
sweep over train.beta compared in the Runs panel."""
from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest
from conftest import PNG, sst2_dev


@pytest.fixture(scope="module")
def pairs(shared_data) -> pd.DataFrame:
    """40 pairs: a prompt asking for a positive sentence, a positive SST-2 sentence chosen, a
    negative one rejected."""
    dev = sst2_dev(shared_data)
    pos, neg = dev[dev.label == "1"].sentence.head(40), dev[dev.label == "0"].sentence.head(40)
    return pd.DataFrame({"prompt": [f"Write a positive review sentence ({i})." for i in range(40)],
                         "chosen": pos.values, "rejected": neg.values})


def dpo_config(tiny_model_dir, tmp_path, **train) -> dict:
    return {"data": {"task": "preference", "val_fraction": 0.2, "test_fraction": 0.2},
            "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
            "train": {"output_dir": str(tmp_path / "run"), "method": "dpo", "max_steps": 6, "batch_size": 4,
                      "eval_steps": 3, "logging_steps": 1, "max_length": 96, "learning_rate": 1e-3} | train,
            "eval": {"num_samples": 2, "max_new_tokens": 4}}


def cells(table_html: str) -> list[list[str]]:
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)] for row in table_html.split("<tr")[2:]]


def test_data_panel_shows_the_pair_checks_and_the_length_bias(tiny_model_dir, tmp_path, pairs):
    from nb_finetune.ui import DataPanel
    panel = DataPanel(config=dpo_config(tiny_model_dir, tmp_path), data=pairs)
    assert {"data.chosen_column", "data.rejected_column"} <= set(panel.forms[1].controls)
    panel.load_button.click()
    assert panel.error.value == "", panel.error.value
    for check in ("pairs: chosen same as rejected", "pairs: duplicates", "pairs: same prompt, contradicting pairs",
                  "pairs: chosen is the longer answer", "leakage: test prompts also in train"):
        assert check in panel.report.value, check
    assert panel.balance_image.shown and panel.balance_image.value.startswith(PNG)
    report = panel.shared.current.prep.report
    longer = (report.pair_lengths["chosen"] > report.pair_lengths["rejected"]).sum()
    row = next(r for r in cells(panel.report.value) if r[0] == "pairs: chosen is the longer answer")
    assert int(row[1]) == longer


def test_tokens_panel_shows_one_pair_side_by_side_with_pair_batch_statistics(tiny_model_dir, tmp_path, pairs):
    from nb_finetune.data.collator import token_table
    from nb_finetune.data.tokens import side_rows
    from nb_finetune.ui import TokenizationPanel
    panel = TokenizationPanel(config=dpo_config(tiny_model_dir, tmp_path), data=pairs)
    panel.preview_button.click()
    panel.row.value = 2  # redraws at once
    assert panel.error.value == "", panel.error.value
    assert "<b>pair 2</b>" in panel.row_info.value
    train = panel.shared.current.prep.splits["train"]
    trained = {}
    for side in ("chosen", "rejected"):
        table = token_table(panel.formatter, side_rows(train.iloc[[2]], side).iloc[0].to_dict())
        trained[side] = int((table["role"] == "response").sum())
        assert trained[side] >= 2  # the answer and its end-of-turn token
    assert panel.tokens.value.count("title='response'") == trained["chosen"] + trained["rejected"]
    assert f"chosen {trained['chosen']} trained tokens, rejected {trained['rejected']}" in panel.row_info.value
    prompt = int(re.search(r"a prompt of (\d+) tokens shared", panel.row_info.value)[1])
    assert prompt > 5 and panel.tokens.value.count("title='prompt'") + panel.tokens.value.count(
        "title='special'") >= prompt  # the shared prompt is shown once, untrained
    stats = dict(cells(panel.batch.value))
    assert "pair batches" in panel.batch.value and stats["pairs sampled"] == str(len(train))
    encoded = {side: panel.formatter.encode_many(side_rows(train, side).to_dict("records"))
               for side in ("chosen", "rejected")}
    counts = {side: np.array([sum(x != -100 for x in e["labels"]) for e in rows]) for side, rows in encoded.items()}
    longer = np.mean(counts["chosen"] > counts["rejected"])
    assert stats["chosen answer longer than the rejected one (trained tokens)"] == f"{longer:.0%} of pairs"
    panel.forms[0].controls["train.max_length"].value = 24  # redraws at once: prompts are cut now
    assert int(dict(cells(panel.batch.value))["pairs with a prompt cut in the middle at max_length 24"]) > 0


def test_pair_batch_padding_is_what_the_pair_collator_adds(tokenizer, pairs):
    from nb_finetune.data.collator import PairCollator, pair_batch_stats
    from nb_finetune.data.formatter import Formatter
    from nb_finetune.data.tokens import side_rows
    fmt = Formatter.build(tokenizer, "preference", [], 96)
    chosen, rejected = (fmt.encode_many(side_rows(pairs, s).to_dict("records")) for s in ("chosen", "rejected"))
    stats = pair_batch_stats(chosen, rejected, 8, 8)
    collate, real, built = PairCollator(tokenizer.pad_token_id, 8), 0, 0
    for start in range(0, len(pairs), 8):
        feats = [c | {"rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]}
                 for c, r in zip(chosen[start:start + 8], rejected[start:start + 8])]
        batch = collate(feats)
        built += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    assert stats["padding_share_rounded"] == pytest.approx(1 - real / built)


def test_train_panel_offers_the_method_and_draws_the_reward_curves(tiny_model_dir, tmp_path, pairs):
    from nb_finetune.config import TrainConfig
    from nb_finetune.ui import Studio
    studio = Studio(dpo_config(tiny_model_dir, tmp_path), data=pairs, foreground=False)
    form = studio.train.forms[0]
    helps = {f.name: f.metadata["help"] for f in TrainConfig.__dataclass_fields__.values()}
    for key in ("train.method", "train.beta", "train.dpo_loss"):
        control = form.controls[key]
        assert (getattr(control, "tooltip", None) or control.description_tooltip) == helps[key.split(".")[1]]
    assert list(form.controls["train.method"].options) == ["sft", "dpo", "orpo"]
    form.controls["train.beta"].value = 0.0  # refused beside the field, as typed
    assert "train.beta" in {p.field for p in studio.shared.problems()} and "&#9888;" in form.errors["train.beta"].value
    form.controls["train.beta"].value = 0.2
    studio.train.start()
    assert studio.train.wait(300)
    assert studio.train.error.value == "" and studio.evaluation.error.value == "", (
        studio.train.error.value, studio.evaluation.error.value)
    history = studio.train.result.history
    assert history["reward_margin"].notna().sum() == 6 and history["val_reward_accuracy"].notna().sum() == 2
    assert studio.train.plot.value.startswith(PNG) and "<b>diagnosis</b>:" in studio.train.diagnosis.value
    assert studio.shared.current.cfg.train.beta == 0.2
    # The evaluation ran when training ended: tuned against base on the held-out pairs.
    ev = studio.evaluation
    metrics = cells(ev.metrics.value)
    assert [r[0] for r in metrics] == ["tuned", "base"] and "preference accuracy [95% interval]" in ev.metrics.value
    result = studio.shared.current.eval_result.metrics
    assert metrics[0][2] == (f"{result.loc['tuned', 'preference_accuracy']:.3f} [{result.loc['tuned', 'accuracy_low']:.3f}"
                             f", {result.loc['tuned', 'accuracy_high']:.3f}]")
    assert ev.margins.shown and ev.margins.value.startswith(PNG)
    assert ev.confusion.layout.display == "none"  # pairs have no confusion matrix: not even its hint
    assert "base and tuned side by side (reference: the chosen answer)" in ev.samples.value
    # The playground answers with the base and the tuned model.
    ev.message.value = "Write a positive review sentence."
    worker = ev.chat()
    worker.join(120)
    assert ev.error.value == "", ev.error.value
    assert all(box.value.startswith(f"<b>{name}</b><br>") for name, box in ev.answers.items())


def test_bad_pairs_and_a_method_on_other_data_are_one_line_in_the_panels(tiny_model_dir, tmp_path, pairs, sst2_frame):
    from nb_finetune.ui import DataPanel, TrainPanel
    broken = pairs.copy()
    broken.loc[3, "rejected"] = " "
    panel = DataPanel(config=dpo_config(tiny_model_dir, tmp_path), data=broken)
    panel.load_button.click()
    assert "row(s) 3 have no rejected answer" in panel.error.value and "details" not in panel.error.value
    config = dpo_config(tiny_model_dir, tmp_path, method="sft")
    config["data"] = {"task": "classification", "text_column": "sentence"}
    train = TrainPanel(config=config, data=sst2_frame, foreground=False)
    train.forms[0].controls["train.method"].value = "dpo"  # on data without pairs
    train.start()
    assert train.wait(60)
    assert "preference" in train.error.value and "details" not in train.error.value, train.error.value
    assert "&#9888;" in train.forms[0].errors["train.method"].value


@pytest.mark.integration  # two whole DPO jobs, through the Runs panel
def test_a_beta_sweep_from_the_runs_panel_compares_dpo_runs(tiny_model_dir, tmp_path, pairs):
    from nb_finetune.ui import RunsPanel
    config = dpo_config(tiny_model_dir, tmp_path, max_steps=4, eval_steps=2)
    config["eval"] = {"num_samples": 0, "max_test_rows": 8}
    panel = RunsPanel(config=config, data=pairs, foreground=False)
    panel.grid.value = "train.beta=0.1,0.5"
    panel.sweep_button.click()
    assert panel.wait(600), panel.sweep_status.value
    assert panel.error.value == "", panel.error.value
    assert len(panel.sweep_result.runs) == 2 and not panel.sweep_result.failed
    header = re.findall(r"<th>(.*?)</th>", panel.table.value)
    rows = {r[header.index("run")]: dict(zip(header, r)) for r in cells(panel.table.value)}
    assert set(rows) == {"run-sweep/beta=0.1", "run-sweep/beta=0.5"}
    assert {r["beta"] for r in rows.values()} == {"0.100", "0.500"} and {r["method"] for r in rows.values()} == {"dpo"}
    for row in rows.values():
        assert 0 <= float(row["test preference accuracy"]) <= 1  # the one test figure, named in the header
        assert row["reward_margin"] != ""
    panel.curve.value = "reward_margin"
    assert panel.figure is not None and panel.figure.axes[0].get_ylabel() == "reward margin"
    assert len(panel.figure.axes[0].lines) >= 2  # a line per run
    assert panel.plot.value.startswith(PNG)
