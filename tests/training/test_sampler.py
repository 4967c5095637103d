"""The order of the training rows: transformers' length groups kept (the same padding), the
steps shuffled so that consecutive steps differ in length; a real short run in both orders;
tokens/s over a window; the diagnosis never reading a length sawtooth as divergence."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import alpaca, alpaca_raw, tiny_run_config
from transformers.trainer_pt_utils import get_length_grouped_indices

from nb_finetune.data.formatter import Formatter
from nb_finetune.data.tokens import tokenize_frame
from nb_finetune.pipeline import Session
from nb_finetune.training import HISTORY_COLUMNS, diagnose
from nb_finetune.training.sampler import shuffled_length_groups, step_order_shares
from nb_finetune.training.trainer import RATE_WINDOW_STEPS, EventBridge, SafeTrainer


@pytest.fixture(scope="module")
def alpaca_lengths(tokenizer, shared_data) -> list[int]:
    """Token lengths of the Alpaca demo rows as trained (max_length 256)."""
    dataset, _ = tokenize_frame(alpaca(shared_data), Formatter.build(tokenizer, "completion", [], 256))
    return [len(row["input_ids"]) for row in dataset]


def steps_of(order: list[int], size: int) -> list[tuple]:
    return [tuple(sorted(order[i:i + size])) for i in range(0, len(order), size)]


def test_shuffled_steps_keep_the_groups_and_the_padding_and_break_the_sawtooth(alpaca_lengths):
    batch = 8
    before = get_length_grouped_indices(alpaca_lengths, batch, generator=torch.Generator().manual_seed(0))
    now = shuffled_length_groups(alpaca_lengths, batch, torch.Generator().manual_seed(0))
    assert sorted(now) == list(range(len(alpaca_lengths)))
    # The same rows in each step, so the same padding; the longest step still first.
    assert sorted(steps_of(now, batch)) == sorted(steps_of(before, batch))
    assert steps_of(now, batch)[0] == steps_of(before, batch)[0]
    old, new = step_order_shares(alpaca_lengths, before, batch), step_order_shares(alpaca_lengths, now, batch)
    assert abs(new["padding_share"] - old["padding_share"]) < 0.01
    # In transformers' order consecutive steps' lengths follow each other (a sawtooth of about
    # 30 steps a megabatch on these rows); shuffled, they do not.
    assert old["consecutive_correlation"] > 0.6 and abs(new["consecutive_correlation"]) < 0.25
    again = shuffled_length_groups(alpaca_lengths, batch, torch.Generator().manual_seed(0))
    assert again == now and shuffled_length_groups(alpaca_lengths, batch, torch.Generator().manual_seed(1)) != now


def test_a_last_short_step_stays_last():
    lengths = list(range(1, 27))  # 26 rows: three steps of 8, then 2
    order = shuffled_length_groups(lengths, 8, torch.Generator().manual_seed(3))
    assert len(order) == 26 and sorted(order[-2:]) == sorted(get_length_grouped_indices(
        lengths, 8, generator=torch.Generator().manual_seed(3))[-2:])


def run_epoch(tiny_model_dir, tmp_path, rows, shuffled: bool, monkeypatch):
    monkeypatch.setattr(SafeTrainer, "shuffle_length_groups", shuffled)
    cfg = tiny_run_config(tiny_model_dir, tmp_path / str(shuffled), max_steps=0, epochs=1, max_length=256,
                          eval_steps=1000, save_steps=1000).with_overrides({"data.task": "completion",
                                                                            "data.text_column": ""})
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(rows)
    return session.train()


@pytest.mark.slow  # two whole epochs
def test_a_real_epoch_in_both_orders_trains_the_same_rows_with_the_same_padding(tiny_model_dir, tmp_path,
                                                                                 shared_data, monkeypatch):
    rows = alpaca_raw(shared_data).iloc[:120]
    before, now = (run_epoch(tiny_model_dir, tmp_path, rows, shuffled, monkeypatch) for shuffled in (False, True))
    assert before.global_step == now.global_step and before.padding.tokens == now.padding.tokens
    shares = before.padding.shares()["batches_padded"], now.padding.shares()["batches_padded"]
    assert abs(shares[0] - shares[1]) < 0.01, shares
    history = now.history.dropna(subset=["train_loss"])
    assert np.isfinite(history["train_loss"]).all() and (history["tokens_per_second"] > 0).all()
    assert not diagnose(now.history).startswith("diverging")


def test_tokens_per_second_counts_tokens_over_time_across_a_window(monkeypatch):
    import types
    clock = iter(range(1000))  # one second a reading
    monkeypatch.setattr("nb_finetune.training.trainer.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    bridge = EventBridge([], None, 0, {})

    class State:
        global_step, num_input_tokens_seen, max_steps = 0, 0, 100

    bridge.on_train_begin(None, State, None)  # t = 0
    rates = []
    for step in range(5, 60, 5):  # each log 1 s later; 100 tokens a step, then 10 a step from step 30
        tokens = 100 * min(step, 30) + 10 * max(step - 30, 0)
        rates.append(bridge.tokens_per_second(step, tokens))
    assert rates[0] == 500  # 500 tokens in the first second
    # At step 55: the window reaches back to the log at step 35 (20 steps, 4 s): 200 tokens / 4 s.
    assert RATE_WINDOW_STEPS == 20 and rates[-1] == pytest.approx((100 * 30 + 10 * 25 - (100 * 30 + 10 * 5)) / 4)


def history(losses, every=5) -> pd.DataFrame:
    rows = [{c: np.nan for c in HISTORY_COLUMNS} | {"step": (i + 1) * every, "train_loss": v}
            for i, v in enumerate(losses)]
    return pd.DataFrame(rows)


def alpaca_sawtooth(steps=123, every=5, megabatch=30) -> np.ndarray:
    """The logged losses of the Alpaca demo run described in the issue: within each megabatch of
    30 steps, from the longest rows to the shortest, the loss rises 1.67 -> 2.73, then falls back
    with the next megabatch; beneath it the model learns slowly."""
    at = np.arange(every, steps + 1, every)
    tooth = 1.67 + (2.73 - 1.67) * ((at - every) % megabatch) / (megabatch - every)
    return tooth - 0.1 * at / steps


def test_a_length_sawtooth_is_never_read_as_divergence():
    sawtooth = alpaca_sawtooth()
    assert sawtooth[0].round(2) == 1.67 and sawtooth[5] > 2.6 and sawtooth[6] < 1.7  # steps 5, 30 and 35
    for end in range(3, len(sawtooth) + 1):  # read live, at every log of the run
        verdict = diagnose(history(sawtooth[:end]))
        assert not verdict.startswith("diverging"), (end, verdict)
    assert diagnose(history(sawtooth)).startswith("learning")
    # The window means of the whole run: flat, not the 1.67 -> 2.7 of its first and last logs.
    first, last = (float(v) for v in diagnose(history(sawtooth)).split("loss ")[1].split(" (")[0].split(" -> "))
    assert abs(last - first) < 0.3


def test_a_loss_that_climbs_and_stays_up_is_diverging():
    at = np.arange(5, 161, 5)
    climbing = 1.7 + 2.5 * at / 160 + 0.1 * np.sin(at)
    verdict = diagnose(history(climbing))
    assert verdict.startswith("diverging") and "learning_rate" in verdict
    assert not diagnose(history(climbing[:15])).startswith("diverging")  # too short to tell from a sawtooth
