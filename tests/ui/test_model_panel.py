"""The model panel: controls that cannot work here, and the estimate made before loading."""
from __future__ import annotations

from conftest import PNG


def test_controls_that_cannot_work_are_disabled_with_the_reason(ui_config, monkeypatch):
    from nb_finetune import hardware
    from nb_finetune.ui import ModelPanel
    monkeypatch.setattr(hardware, "bitsandbytes_available", lambda: (False, "bitsandbytes is not installed"))
    monkeypatch.setattr(hardware, "bf16_supported", lambda: False)
    panel = ModelPanel(config=ui_config)
    quant = next(f for f in panel.forms if "model.quantization" in f.controls)
    assert quant.controls["model.quantization"].disabled
    assert "not installed" in quant.notes["model.quantization"].value
    dtype = panel.forms[0].controls["model.compute_dtype"]
    assert "bfloat16" not in dtype.options and "not supported" in panel.forms[0].notes["model.compute_dtype"].value


def test_the_built_in_models_are_offered_gemma_among_them(ui_config):
    from nb_finetune.ui import ModelPanel
    name = ModelPanel(config=ui_config).forms[0].controls["model.name"]
    assert {"smollm2-135m-instruct", "minilm-l6", "gemma3-270m"} <= set(name.options)


def test_a_tracker_without_its_package_is_noted_with_the_install(ui_config, monkeypatch):
    import sys

    from nb_finetune.ui import ModelPanel
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec's answer for a module not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    form = next(f for f in ModelPanel(config=ui_config).forms if "train.report_to" in f.controls)
    assert list(form.controls["train.report_to"].options) == ["none", "tensorboard", "mlflow"]
    note = form.notes["train.report_to"].value
    assert "tensorboard: pip install tensorboard" in note and "mlflow: pip install mlflow" in note


def test_model_panel_estimates_trainable_parameters_before_loading(smollm2_dir):
    """With no arguments the panel uses the built-in demo and shows its LoRA size; the figure
    must equal what peft reports once the model is really loaded."""
    from nb_finetune import modeling
    from nb_finetune.config import load_preset
    from nb_finetune.ui import ModelPanel
    panel = ModelPanel()
    assert panel.error.value == "", panel.error.value
    cfg = load_preset("demo")
    model = modeling.add_lora(modeling.load_base(cfg.model, "completion", progress=lambda m: None),
                              cfg.model, "completion")
    trainable, _ = modeling.trainable_parameters(model)
    assert f"{trainable:,} trainable" in panel.estimate_text.value
    assert "GiB" in panel.estimate_text.value and bytes(panel.memory_image.value).startswith(PNG)
    assert "CPU" in panel.hardware.value or "GPU" in panel.hardware.value
