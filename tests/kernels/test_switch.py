"""The one switch, `train.cpu_kernels`: real short training runs on the tiny llama. Off, they
run peft's own layers and transformers' own loss and attention; auto (on a CPU), the kernels,
which are put back when training ends; both give the same losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora.layer import Linear
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nb_finetune import RunConfig, hardware, kernels
from nb_finetune.kernels.attention import NAME as SHORT_ROW_ATTENTION
from nb_finetune.kernels.dropout import FastDropout
from nb_finetune.pipeline import Session
from nb_finetune.training import Callback


def _session(tiny_model_dir, out, frame, cpu_kernels: str, lora_dropout: float, compute_dtype: str = "auto"):
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8, "lora_dropout": lora_dropout,
                  "compute_dtype": compute_dtype},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 4, "eval_steps": 2, "logging_steps": 1,
                  "max_length": 64, "learning_rate": 1e-3, "cpu_kernels": cpu_kernels}})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(frame)
    s.load_model()
    return s


class Spy(Callback):
    """What the model is made of while it trains: at each log and validation (between steps),
    and in every forward pass (a hook on the causal LM, inside the trainer's loss)."""

    def __init__(self, model):
        self.model, self.base = model, model.get_base_model()
        self.info, self.between, self.passes = None, [], []
        self.base.register_forward_pre_hook(lambda module, args: self.passes.append(self.inside_pass()))
        self.head_rows = []  # positions the model's own head projected, per pass
        self.base.lm_head.register_forward_hook(lambda module, args, out: self.head_rows.append(out[..., 0].numel()))

    def inside_pass(self) -> dict:
        return {"grad": torch.is_grad_enabled(), "head": type(self.base.lm_head),
                "own loss": "_loss_function" not in vars(self.base),
                "attention": self.base.config._attn_implementation}

    def layers(self) -> dict:
        attention = ALL_ATTENTION_FUNCTIONS.get(SHORT_ROW_ATTENTION)
        return {"lora": {"fast" if getattr(m, "fast", False) else "peft's"
                         for m in self.model.modules() if isinstance(m, Linear)},
                "dropout": {type(d) for m in self.model.modules() if isinstance(m, Linear) for d in m.lora_dropout.values()},
                "frozen": {m.base_layer.weight.dtype for m in self.model.modules() if isinstance(m, Linear)},
                "attention": self.base.config._attn_implementation,
                "masks built": getattr(attention, "masks_built", 0)}

    def on_train_begin(self, info):
        self.info = info

    def on_log(self, row, history):
        self.between.append(("log", self.layers()))

    def on_evaluate(self, row, history):
        self.between.append(("eval", self.layers()))


def _spied_run(tiny_model_dir, out, frame, cpu_kernels):
    s = _session(tiny_model_dir, out, frame, cpu_kernels, lora_dropout=0.1)
    spy = Spy(s.model)
    dropouts = [d for m in s.model.modules() if isinstance(m, Linear) for d in m.lora_dropout.values()]
    assert len(dropouts) == 14 and all(type(d) is torch.nn.Dropout for d in dropouts)
    head = s.model.get_base_model().lm_head
    result = s.train([spy])
    assert result.global_step == 4
    assert [k for k, _ in spy.between].count("log") == 4 and [k for k, _ in spy.between].count("eval") == 2
    assert any(p["grad"] for p in spy.passes) and any(not p["grad"] for p in spy.passes)  # training and validation
    return s, spy, dropouts, head


def test_off_trains_with_peft_s_layers_and_transformers_own_loss_and_attention(tiny_model_dir, tmp_path, sst2_frame):
    s, spy, dropouts, head = _spied_run(tiny_model_dir, tmp_path / "off", sst2_frame, "off")
    assert spy.info["kernels"] == "CPU kernels: off (train.cpu_kernels)"
    for _, seen in spy.between:
        assert seen["lora"] == {"peft's"} and seen["dropout"] == {torch.nn.Dropout}
        assert seen["frozen"] == {torch.float32} and seen["attention"] == "sdpa"
    for seen in spy.passes:
        assert seen["head"] is torch.nn.Linear and seen["own loss"] and seen["attention"] == "sdpa"
    assert spy.head_rows and min(spy.head_rows) > 0  # the head projects the trained positions


def test_auto_on_a_cpu_trains_with_the_kernels_and_puts_everything_back(tiny_model_dir, tmp_path, sst2_frame):
    if hardware.cuda_available():
        pytest.skip("auto leaves the kernels off on a GPU")
    s, spy, dropouts, head = _spied_run(tiny_model_dir, tmp_path / "auto", sst2_frame, "auto")
    base = s.model.get_base_model()
    for part in ("LoRA layers (14), dropout (14)", "attention for rows", "fused loss"):
        assert part in spy.info["kernels"], spy.info["kernels"]
    compute = torch.bfloat16 if s.precision == "bfloat16" else torch.float32
    for _, seen in spy.between:
        assert seen["lora"] == {"fast"} and seen["dropout"] == {FastDropout}
        assert seen["frozen"] == {compute} and seen["attention"] == SHORT_ROW_ATTENTION
    assert spy.between[-1][1]["masks built"] >= 4  # the short-row attention ran, a mask per training pass
    for seen in spy.passes:  # the fused loss is called by the trainer: the model keeps its head and loss
        assert seen["head"] is torch.nn.Linear and seen["own loss"] and seen["attention"] == SHORT_ROW_ATTENTION
    assert spy.head_rows and set(spy.head_rows) == {0}  # and its head projects no position: the fused loss does
    # Put back: peft's own classes and the very dropout modules, the head and loss, sdpa, fp32 weights.
    layers = [m for m in s.model.modules() if isinstance(m, Linear)]
    assert len(layers) == 14 and not any(m.fast or "same_input" in vars(m) for m in layers)
    now = [d for m in layers for d in m.lora_dropout.values()]
    assert all(a is b for a, b in zip(now, dropouts)) and all(type(d) is torch.nn.Dropout for d in now)
    assert base.lm_head is head and "_loss_function" not in vars(base)
    assert base.config._attn_implementation == "sdpa"
    assert SHORT_ROW_ATTENTION not in ALL_ATTENTION_FUNCTIONS and SHORT_ROW_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS
    assert all(m.base_layer.weight.dtype == torch.float32 for m in layers)


def test_the_switch_says_where_the_kernels_apply(monkeypatch):
    assert set(kernels.SETTINGS) == {"auto", "off"}
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    assert kernels.wanted("auto") is True and kernels.wanted("off") is False
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)  # a GPU trains with peft's and transformers' own
    assert kernels.wanted("auto") is False and kernels.wanted("off") is False
    with kernels.for_training(torch.nn.Linear(2, 2), "float32", enabled=False) as applied:
        assert applied.parts == [] and applied.fused_loss is None
    with kernels.for_inference(False) as kept:
        assert kept is False


def test_the_config_refuses_another_setting():
    from nb_finetune import ConfigError
    assert RunConfig().train.cpu_kernels == "auto"
    with pytest.raises(ConfigError, match="cpu_kernels"):
        RunConfig.from_dict({"train": {"cpu_kernels": "on"}})


@pytest.mark.skipif(hardware.cuda_available(), reason="auto leaves the kernels off on a GPU")
def test_both_settings_give_the_same_losses(tiny_model_dir, tmp_path, sst2_frame):
    """The switch changes the speed, not the results: the same training and validation losses
    in fp32, to rounding. Dropout 0: FastDropout draws its masks from another generator (the
    same distribution, tests/kernels/test_dropout.py), so with dropout the runs would differ
    by their masks."""
    histories = {}
    for setting in ("off", "auto"):
        s = _session(tiny_model_dir, tmp_path / setting, sst2_frame, setting, lora_dropout=0.0, compute_dtype="float32")
        assert s.precision == "float32"
        histories[setting] = s.train().history
    off, auto = histories["off"], histories["auto"]
    assert off["step"].tolist() == auto["step"].tolist() == [1, 2, 3, 4]
    assert off["train_loss"].iloc[-1] != off["train_loss"].iloc[0]  # it trained: the comparison has teeth
    np.testing.assert_allclose(auto["train_loss"], off["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(auto["val_loss"].dropna(), off["val_loss"].dropna(), rtol=1e-4)
    np.testing.assert_array_equal(auto["val_accuracy"].dropna(), off["val_accuracy"].dropna())
