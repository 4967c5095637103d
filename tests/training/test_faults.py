"""Interruption and faults: stop/resume equality, a kill during a save, a loss that stops being a
number, running out of memory or disk. Tiny random llama with the real SmolLM2 tokenizer."""
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_ENV, prepared_session
from safetensors.torch import load_file
from tiny_runs import StopAt

from nb_finetune import RunConfig, UserError
from nb_finetune.training import Callback


def _cfg(model_dir, out, **train):
    """Not conftest's tiny_run_config: these tests stop, kill and resume on a checkpoint every 3
    steps, no validation in between, no dropout, and `out` as the output folder itself."""
    return RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(model_dir), "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 4, "eval_steps": 100, "save_steps": 3,
                  "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3} | train})


def test_stop_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, sst2_frame):
    whole = prepared_session(_cfg(tiny_model_dir, tmp_path / "whole"), sst2_frame).train()

    stop = threading.Event()
    cfg = _cfg(tiny_model_dir, tmp_path / "split")
    first = prepared_session(cfg, sst2_frame).train([StopAt(stop, 4)], stop=stop)
    assert first.stopped and first.global_step == 4
    second = prepared_session(cfg.with_overrides({"train.resume_from": "last"}), sst2_frame).train()
    assert second.global_step == 6

    a = whole.history.set_index("step")["train_loss"]
    b = second.history.set_index("step")["train_loss"]
    np.testing.assert_allclose(b.loc[[5, 6]].to_numpy(), a.loc[[5, 6]].to_numpy(), rtol=2e-3)
    wa = load_file(whole.adapter_dir / "adapter_model.safetensors")
    wb = load_file(second.adapter_dir / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=2e-3, atol=2e-4)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import Trainer
    from nb_finetune import RunConfig
    from nb_finetune.pipeline import Session
    import pandas as pd
    saves = []
    original = Trainer._save_rng_state
    def dying(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:  # the second checkpoint: weights and optimizer written, then killed
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    Trainer._save_rng_state = dying
    cfg = RunConfig.load(sys.argv[1])
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(pd.read_csv(sys.argv[2], dtype=str))
    s.train()
""")


@pytest.mark.slow  # a whole run in its own process, killed
def test_kill_during_save_leaves_no_checkpoint_that_resume_would_load(tiny_model_dir, tmp_path, sst2_frame):
    from transformers.trainer_utils import get_last_checkpoint

    from nb_finetune.training.trainer import last_checkpoint
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, out)
    cfg.save(tmp_path / "c.yaml")
    sst2_frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "c.yaml"),
                           str(tmp_path / "d.csv")], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    # The half-written checkpoint-6 has weights but no trainer state: transformers' own pick would load it.
    assert (ckpts / "checkpoint-6").is_dir() and not (ckpts / "checkpoint-6" / "trainer_state.json").exists()
    assert get_last_checkpoint(str(ckpts)).endswith("checkpoint-6")
    assert last_checkpoint(ckpts).name == "checkpoint-3"
    resumed = prepared_session(cfg.with_overrides({"train.resume_from": "last"}), sst2_frame).train()
    assert resumed.global_step == 6 and resumed.history["step"].min() == 4
    assert resumed.last_checkpoint.name == "checkpoint-6" and (ckpts / "checkpoint-6" / "trainer_state.json").is_file()


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, tmp_path, sst2_frame):
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "nan", max_steps=10), sst2_frame)
    s.load_model()
    steps = []

    class Poison(Callback):
        def on_log(self, row, history):
            steps.append(row["step"])

    def hook(module, args, output):  # from the 5th forward pass on, the last hidden states are NaN
        hook.calls += 1
        return output * float("nan") if hook.calls >= 5 else output
    hook.calls = 0
    s.model.get_base_model().model.norm.register_forward_hook(hook)
    with pytest.raises(UserError) as err:
        s.train([Poison()])
    msg = str(err.value)
    assert "became nan at step 5" in msg and "learning rate" in msg and "checkpoint-3" in msg
    assert steps == [1, 2, 3, 4]  # the broken step never reached the history
    assert (tmp_path / "nan" / "history.csv").is_file()
    assert not (tmp_path / "nan" / "adapter").exists()  # broken weights are not saved


def test_out_of_memory_gets_advice(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    from transformers import Trainer

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(Trainer, "train", oom)
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "oom", batch_size=8), sst2_frame)
    with pytest.raises(UserError, match="out of memory at batch_size 8.*batch_size 4 with train.grad_accum 2.*4bit"):
        s.train()


def test_full_disk_is_refused_before_training(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "full"), sst2_frame)
    with pytest.raises(UserError, match="1 MiB free, and training needs about .* MiB for checkpoints"):
        s.train()
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_max_length_beyond_the_model_context(tiny_model_dir, tmp_path, sst2_frame):
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "ctx", max_length=4096), sst2_frame)
    with pytest.raises(UserError, match="longer than .* context of 1024 tokens; set it to at most 1024"):
        s.tokenize()


def test_keyboard_interrupt_is_a_stop_that_keeps_the_steps_done(tiny_model_dir, tmp_path, sst2_frame):
    """A notebook's kernel interrupt arrives as KeyboardInterrupt in the middle of the loop."""
    class Interrupt(Callback):
        def on_log(self, row, history):
            if row["step"] == 2:
                raise KeyboardInterrupt
    result = prepared_session(_cfg(tiny_model_dir, tmp_path / "ki"), sst2_frame).train([Interrupt()])
    assert result.stopped and result.global_step == 2
    assert result.last_checkpoint.name == "checkpoint-2"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.history["step"].tolist() == [1, 2]


def test_an_interrupt_keeps_the_adapter_where_transformers_lacks_the_checkpoint_call(
        tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    """The interrupt's checkpoint uses the Trainer's private _save_checkpoint; a transformers
    without it gets a line naming its version, and the adapter of the steps done."""
    import transformers
    from transformers import Trainer

    class Interrupt(Callback):
        def on_log(self, row, history):
            if row["step"] == 2:
                raise KeyboardInterrupt
    monkeypatch.delattr(Trainer, "_save_checkpoint")
    said = []
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "ki"), sst2_frame)
    s.progress = said.append
    result = s.train([Interrupt()])
    assert result.stopped and result.global_step == 2 and result.last_checkpoint is None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert any(f"transformers {transformers.__version__} has no Trainer._save_checkpoint" in line for line in said)


def _oom_above(monkeypatch, rows: int, seen: list):
    """A training step that runs out of GPU memory on batches of more than `rows` rows; `seen`
    gets (rows, gradient checkpointing on) for each step tried."""
    from transformers import Trainer
    original = Trainer.training_step

    def step(self, model, inputs, *a, **k):
        seen.append((inputs["input_ids"].shape[0], bool(self.args.activation_checkpointing)))
        if inputs["input_ids"].shape[0] > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, model, inputs, *a, **k)
    monkeypatch.setattr(Trainer, "training_step", step)


def test_gpu_out_of_memory_halves_the_batch_and_keeps_the_effective_batch(tiny_model_dir, tmp_path, sst2_frame,
                                                                           monkeypatch):
    seen, said = [], []
    _oom_above(monkeypatch, 2, seen)
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "rescue", batch_size=8, max_steps=3, save_steps=100),
                         sst2_frame)
    s.progress = said.append

    class Begin(Callback):
        infos = []

        def on_train_begin(self, info):
            self.infos.append(info)
    result = s.train([Begin()])
    assert result.global_step == 3 and result.history["train_loss"].notna().all()
    rescues = [m for m in said if m.startswith("out of GPU memory")]
    assert rescues == ["out of GPU memory at batch_size 8: retrying with batch_size 4 and 2 passes per step "
                       "(the same effective batch)",
                       "out of GPU memory at batch_size 4: retrying with batch_size 2 and 4 passes per step "
                       "(the same effective batch)"]
    assert [rows for rows, _ in seen[:2]] == [8, 4] and {rows for rows, _ in seen[2:]} == {2}
    assert len(seen) == 2 + 3 * 4  # the failed tries, then 3 steps of 4 passes of 2 rows: 8 rows a step
    last = Begin.infos[-1]
    assert (last["batch_size"], last["grad_accum"], last["effective_batch"]) == (2, 4, 8)
    assert last["rescues"] == rescues


def test_gpu_out_of_memory_at_one_row_turns_checkpointing_on_then_gives_advice(tiny_model_dir, tmp_path, sst2_frame,
                                                                               monkeypatch):
    seen, said = [], []
    _oom_above(monkeypatch, 0, seen)  # nothing fits
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "hopeless", batch_size=2, gradient_checkpointing="no"),
                         sst2_frame)
    s.progress = said.append
    with pytest.raises(UserError, match="out of memory at batch_size 1.*max_length 64"):
        s.train()
    assert seen == [(2, False), (1, False), (1, True)]
    assert [m for m in said if m.startswith("out of GPU memory")][-1].startswith(
        "out of GPU memory at batch_size 1: retrying with gradient checkpointing")


def test_gpu_out_of_memory_after_the_first_step_is_not_restarted(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    """Past the first optimizer step the weights have moved; a restart would train another run."""
    from transformers import Trainer
    original, calls = Trainer.training_step, []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(self, *a, **k)
    monkeypatch.setattr(Trainer, "training_step", step)
    s = prepared_session(_cfg(tiny_model_dir, tmp_path / "late", batch_size=4), sst2_frame)
    with pytest.raises(UserError, match="out of memory at batch_size 4"):
        s.train()
    assert len(calls) == 3
