"""The kernels against a peft or transformers that has changed what they use: they stay off for
the run, said in one line naming the library, its version and what it lacks."""
from __future__ import annotations

import pytest
import torch
import transformers.masking_utils
from kernel_inputs import lora_model
from peft.tuners.lora.layer import Linear

from nb_finetune import RunConfig, hardware, kernels
from nb_finetune.kernels import compat
from nb_finetune.pipeline import Session
from nb_finetune.training import Callback


def defining(cls, name: str):
    """The class in cls's MRO whose own dict holds `name` (peft keeps methods on mixins)."""
    return next(k for k in cls.__mro__ if name in vars(k))


def applied_to(model) -> kernels.Applied:
    with kernels.for_training(model, "float32", enabled=True) as applied:
        assert not any(getattr(m, "fast", False) for m in model.modules())  # peft's own forward
        return applied


def test_the_installed_libraries_have_what_the_kernels_use(tiny_model_dir):
    assert compat.missing(lora_model(tiny_model_dir)) is None


def test_a_peft_without_a_method_the_kernels_call_keeps_them_off(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir)
    monkeypatch.delattr(defining(Linear, "_cast_input_dtype"), "_cast_input_dtype")
    applied = applied_to(model)
    version = compat.version("peft")
    assert applied.parts == [] and applied.fused_loss is None
    assert applied.describe() == (f"CPU kernels off: peft {version} has no method LoRA Linear._cast_input_dtype; "
                                  "training runs peft's own code")


def test_a_peft_layer_whose_attribute_changed_keeps_them_off(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir)
    for layer in (m for m in model.modules() if isinstance(m, Linear)):
        monkeypatch.setattr(layer, "lora_variant", None)  # no longer a mapping of adapters
    assert "peft" in applied_to(model).describe() and "LoRA Linear.lora_variant" in applied_to(model).describe()


def test_a_transformers_without_a_name_the_kernels_import_keeps_them_off(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir)
    monkeypatch.delattr(transformers.masking_utils, "sdpa_mask")
    line = applied_to(model).describe()
    assert line.startswith(f"CPU kernels off: transformers {compat.version('transformers')} has no "
                           "transformers.masking_utils.sdpa_mask")
    assert model.get_base_model().config._attn_implementation == "sdpa"


class Heard(Callback):
    def __init__(self):
        self.info = None

    def on_train_begin(self, info):
        self.info = info


def test_a_run_with_a_changed_peft_trains_without_the_kernels_and_says_so(tiny_model_dir, tmp_path, sst2_frame,
                                                                          monkeypatch):
    if hardware.cuda_available():
        pytest.skip("auto leaves the kernels off on a GPU")
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "eval_steps": 2,
                  "max_length": 64, "cpu_kernels": "auto"}})
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(sst2_frame)
    import peft.helpers
    monkeypatch.delattr(peft.helpers, "disable_input_dtype_casting")  # the kernels use it, peft's own code does not
    heard = Heard()
    result = session.train([heard])
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.history["train_loss"].dropna().to_numpy())).all()
    line = heard.info["kernels"]
    assert line == (f"CPU kernels off: peft {compat.version('peft')} has no peft.helpers.disable_input_dtype_casting; "
                    "training runs peft's own code")
