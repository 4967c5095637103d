"""Training on a tiny random llama (2 layers, 64 wide) with the real SmolLM2 tokenizer: events,
history, stop and resume, early stopping, a classification head, packing, and the tokens a
session keeps."""
import math
import threading

import numpy as np
import pytest
import torch
from conftest import alpaca_raw, prepared_session, tiny_run_config

from nb_finetune.pipeline import Session
from nb_finetune.training import HISTORY_COLUMNS, Callback


class Recorder(Callback):
    def __init__(self, stop_at=None, stop=None):
        self.events, self.stop_at, self.stop = [], stop_at, stop

    def on_train_begin(self, info):
        self.events.append(("begin", info))

    def on_log(self, row, history):
        self.events.append(("log", row))
        if self.stop_at and row["step"] >= self.stop_at:
            self.stop.set()

    def on_evaluate(self, row, history):
        self.events.append(("eval", row))

    def on_train_end(self, result):
        self.events.append(("end", result))


def test_trains_emits_events_and_keeps_history(tiny_model_dir, tmp_path, sst2_frame):
    rec = Recorder()
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path), sst2_frame)
    result = s.train([rec])
    kinds = [k for k, _ in rec.events]
    assert kinds[0] == "begin" and kinds[-1] == "end"
    assert kinds.count("log") == 6 and kinds.count("eval") == 2
    assert rec.events[0][1]["max_steps"] == 6 and rec.events[0][1]["trainable"] > 0
    h = result.history
    assert list(h.columns) == HISTORY_COLUMNS
    assert h["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert h["train_loss"].notna().all() and (h["tokens_per_second"] > 0).all()
    evals = h.dropna(subset=["val_loss"])
    assert evals["step"].tolist() == [3, 6]
    assert ((evals["val_accuracy"] >= 0) & (evals["val_accuracy"] <= 1)).all()
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]  # 1e-3 on 6 steps: it learns
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "history.csv").is_file()
    assert result.last_checkpoint.name == "checkpoint-6"


def test_trains_where_ipython_is_missing(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    # A headless run (a GPU server, a launcher's worker) may have no IPython; importing
    # transformers' notebook callback would need it.
    import sys
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.delitem(sys.modules, "transformers.utils.notebook", raising=False)
    with pytest.raises(ImportError):
        import transformers.utils.notebook  # noqa: F401
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path, max_steps=2, eval_steps=2), sst2_frame)
    assert s.train().history["step"].tolist() == [1, 2]


def test_bf16_asked_for_on_a_cpu_without_it_computes_in_fp32(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    # torch emulates bf16 on such a CPU, 30x slower per matmul; the qlora-gpu preset asks for it.
    from nb_finetune import hardware
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "bf16_supported", lambda: True)
    assert hardware.compute_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(hardware, "bf16_supported", lambda: False)
    assert hardware.compute_dtype("bfloat16") == "float32" and hardware.compute_dtype("auto") == "float32"
    messages = []
    cfg = tiny_run_config(tiny_model_dir, tmp_path).with_overrides({"model.compute_dtype": "bfloat16"})
    s = Session(cfg, progress=messages.append)
    s.prepare_data(sst2_frame)
    s.load_model()
    assert s.precision == "float32" and any("no AVX-512 BF16" in m and "computing in float32" in m for m in messages)


def test_same_seed_same_losses(tiny_model_dir, tmp_path, sst2_frame):
    losses = []
    for i in range(2):
        s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path / str(i), max_steps=3, eval_steps=3), sst2_frame)
        losses.append(s.train().history["train_loss"].to_numpy())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_stop_flag_keeps_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path, sst2_frame):
    stop = threading.Event()
    rec = Recorder(stop_at=2, stop=stop)
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=6, eval_steps=10)
    result = prepared_session(cfg, sst2_frame).train([rec], stop=stop)
    assert result.stopped and result.global_step == 2
    assert result.last_checkpoint.name == "checkpoint-2"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()

    resumed = prepared_session(cfg.with_overrides({"train.resume_from": "last"}), sst2_frame).train()
    assert not resumed.stopped and resumed.global_step == 6
    assert resumed.history["step"].min() == 3  # it did not start over


def test_early_stopping_on_flat_validation_loss(tiny_model_dir, tmp_path, sst2_frame):
    # lr at its floor: validation loss cannot improve by the 1e-4 margin, so patience 2 ends it
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=20, eval_steps=1, learning_rate=1e-7,
               early_stopping_patience=2)
    result = prepared_session(cfg, sst2_frame).train()
    assert result.early_stopped and result.global_step == 3


def test_decoder_with_classification_head(tiny_model_dir, tmp_path, sst2_frame):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=3).with_overrides({"model.objective": "head"})
    s = prepared_session(cfg, sst2_frame)
    s.train()
    assert s.objective == "head"
    assert type(s.model.base_model.model).__name__ == "LlamaForSequenceClassification"
    head = [n for n, p in s.model.named_parameters() if p.requires_grad and "score" in n]
    assert head, "the classification head is trained with the adapter"
    ev = s.evaluate()
    assert list(ev.metrics.index)[0] == "tuned" and "base" not in ev.metrics.index  # an untrained head has no zero-shot
    assert len(ev.samples) == 0
    assert ev.instruction == ""  # the head never saw one


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tmp_path, sst2_frame):
    runs = {}
    for mode in ("no", "yes"):
        cfg = tiny_run_config(tiny_model_dir, tmp_path / mode, max_steps=3, eval_steps=3, gradient_checkpointing=mode)
        runs[mode] = prepared_session(cfg, sst2_frame).train().history["train_loss"].to_numpy()
    np.testing.assert_allclose(runs["yes"], runs["no"], rtol=1e-4)


@pytest.mark.slow  # two whole epochs through the Session
def test_packed_epoch_takes_fewer_steps_over_the_same_rows(tiny_model_dir, tmp_path, shared_data):
    """train.packing through the Session: an epoch of real Alpaca rows packed to 256 tokens
    takes fewer optimizer steps than unpacked, learns, and keeps
    validation unpacked."""
    rows = alpaca_raw(shared_data).iloc[:80]
    runs, begins, said = {}, {}, []
    for packing in (False, True):
        cfg = tiny_run_config(tiny_model_dir, tmp_path / str(packing), max_steps=0, epochs=1, max_length=256, eval_steps=2,
                   packing=packing).with_overrides({"data.task": "completion", "data.text_column": ""})
        s = Session(cfg, progress=said.append)
        s.prepare_data(rows)
        recorder = Recorder()
        runs[packing] = s.train(callbacks=[recorder])
        begins[packing] = recorder.events[0][1]
    plain, packed = runs[False], runs[True]
    n = len(s.datasets["train"])
    assert begins[False]["train_rows"] == n and plain.global_step == math.ceil(n / 4)
    packed_rows = begins[True]["train_rows"]
    assert packed_rows < n * 0.8 and packed.global_step == math.ceil(packed_rows / 4) < plain.global_step
    assert f"packing: {n} rows into {packed_rows} rows of at most 256 tokens" in said
    assert np.isfinite(packed.history["train_loss"].dropna()).all()
    # Learning is read from validation (the same rows each time, scored unpacked): one step's
    # training loss follows what its rows are, and the steps come in random order.
    val = packed.history["val_loss"].dropna()
    assert len(val) >= 2 and np.isfinite(val).all() and val.iloc[-1] < val.iloc[0]


def test_packing_with_a_classification_head_is_refused_before_loading(tiny_model_dir, tmp_path, sst2_frame):
    from nb_finetune import UserError
    cfg = tiny_run_config(tiny_model_dir, tmp_path, packing=True).with_overrides({"model.objective": "head"})
    s = prepared_session(cfg, sst2_frame)
    with pytest.raises(UserError, match="train.packing needs a causal-LM objective"):
        s.train()
    assert s.model is None


def test_session_reuses_tokens_across_lora_settings_and_runs(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    """New LoRA settings keep the tokens (and drop the model); a new max_length re-tokenizes; a
    second session on the same rows and settings reads them from the disk cache."""
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    s = prepared_session(cfg, sst2_frame)
    s.load_model()
    train = s.datasets["train"]
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 2  # train and validation
    s.reconfigure(cfg.with_overrides({"model.lora_r": 8}))
    assert s.model is None and s.datasets["train"] is train
    s.load_model()
    assert s.model.peft_config["default"].r == 8 and s.datasets["train"] is train
    s.reconfigure(cfg.with_overrides({"model.lora_r": 8, "train.max_length": 48}))
    assert s.model is None and s.datasets == {}
    said = []
    again = Session(cfg, progress=said.append)
    again.prepare_data(sst2_frame)
    again.tokenize()
    assert [m for m in said if "read from the cache" in m] == [
        f"{name}: tokens of {len(s.prep.splits[name])} rows read from the cache ({tmp_path / 'cache' / 'tokens'})"
        for name in ("train", "validation")]
    assert again.datasets["train"].features == train.features
    off = Session(cfg.with_overrides({"train.cache_tokens": False}), progress=said.append)
    off.prepare_data(sst2_frame)
    monkeypatch.setattr("nb_finetune.data.tokens.cached", None)  # would fail if called
    off.tokenize()
    assert off.datasets["train"].features == train.features


def test_liger_asked_for_without_a_gpu_trains_with_transformers_layers_and_says_so(tiny_model_dir, tmp_path,
                                                                                   sst2_frame):
    from nb_finetune import hardware
    if hardware.liger_available()[0]:
        pytest.skip("Liger Kernel is usable here; the fallback is what this checks")
    messages, infos = [], []

    class Begin(Callback):
        def on_train_begin(self, info):
            infos.append(info)
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, liger_kernel="on"),
                         sst2_frame)
    s.progress = messages.append
    assert s.train([Begin()]).global_step == 2
    notes = [m for m in messages if m.startswith("Liger Kernel off: ")]
    assert len(notes) == 1 and "transformers' own layers" in notes[0] and infos[0]["liger_kernel"] is False


def test_a_trained_model_scores_the_same_every_time(tiny_model_dir, tmp_path, sst2_frame):
    """Without validation rows the Trainer ends in torch's train mode, dropout on. What runs next
    on the session's model (a probe, the playground, an export) must score the model, not a
    fresh dropout draw."""
    import pandas as pd

    from nb_finetune.probes import runner
    from nb_finetune.probes.pairs import PairSet
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=2).with_overrides({"model.lora_dropout": 0.5,
                                                                                  "data.val_fraction": 0.0})
    s = prepared_session(cfg, sst2_frame)
    s.train()
    pairs = PairSet("two", pd.DataFrame({"more": ["The film was dull and long.", "A warm, funny story."],
                                         "less": ["The film was short and sharp.", "A cold, grim story."],
                                         "bias_type": ["x", "x"]}))
    scores = [runner.pair_probe(s.probe_target(), pairs, progress=lambda m: None)["tuned"].scores
              for _ in range(2)]
    assert scores[0]["more_logprob"].tolist() == scores[1]["more_logprob"].tolist()
    assert not s.model.training
    s.model.train()  # a model someone put back in train mode: the probe turns dropout off itself
    again = runner.pair_probe(s.probe_target(), pairs, progress=lambda m: None)["tuned"].scores
    assert again["more_logprob"].tolist() == scores[0]["more_logprob"].tolist()


def test_the_trained_model_runs_in_float32_after_mixed_precision_training(tiny_model_dir, tmp_path, sst2_frame,
                                                                          monkeypatch):
    """Training in bf16 wraps the model's forward in autocast (accelerate's mixed precision).
    Left on, every score after training (evaluation, probes, the playground) would run in bf16
    where float32 is asked for: a padded batch then scores a sentence up to a few tenths of a nat
    away from the sentence alone (CrowS-Pairs on Gemma 3 after a full run)."""
    from nb_finetune import hardware
    monkeypatch.setattr(hardware, "bf16_supported", lambda: True)
    s = prepared_session(tiny_run_config(tiny_model_dir, tmp_path, max_steps=2), sst2_frame)
    assert s.precision == "bfloat16"
    s.train()
    seen = []
    layer = s.model.get_base_model().model.layers[0].mlp
    layer.register_forward_hook(lambda module, args, out: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        s.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [False]
