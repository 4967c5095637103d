"""The precision policy: a pure function of the hardware facts, its table checked row by row."""
import pytest

from nb_finetune import hardware

# (machine, cuda, bf16, choice) -> (dtype, bf16 offered, loss scaling)
TABLE = [
    ("CPU without bf16", False, False, "auto", "float32", False, False),
    ("CPU without bf16", False, False, "bfloat16", "float32", False, False),
    ("CPU without bf16", False, False, "float32", "float32", False, False),
    ("CPU with AVX-512 BF16 / AMX", False, True, "auto", "bfloat16", True, False),
    ("CPU with AVX-512 BF16 / AMX", False, True, "float32", "float32", True, False),
    ("T4 / V100", True, False, "auto", "float16", False, True),
    ("T4 / V100", True, False, "bfloat16", "float16", False, True),
    ("T4 / V100", True, False, "float32", "float32", False, False),
    ("A100 / H100", True, True, "auto", "bfloat16", True, False),
    ("A100 / H100", True, True, "float16", "float16", True, True),
]


@pytest.mark.parametrize("machine,cuda,bf16,choice,dtype,offered,scaling", TABLE)
def test_precision_policy_table(machine, cuda, bf16, choice, dtype, offered, scaling):
    p = hardware.precision_policy(choice, cuda, bf16)
    assert (p.dtype, p.bf16_allowed, p.loss_scaling) == (dtype, offered, scaling), machine
    assert (p.reason == "") == bf16
    if not bf16:
        assert p.reason.startswith("bfloat16: not supported on this " + ("GPU" if cuda else "CPU"))


def test_compute_dtype_follows_the_policy_for_this_machine():
    p = hardware.precision_policy("auto", hardware.cuda_available(), hardware.bf16_supported())
    assert hardware.compute_dtype("auto") == p.dtype


def test_panel_disables_bf16_on_a_gpu_without_it(ui_config, monkeypatch):
    from nb_finetune.ui import ModelPanel
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "bf16_supported", lambda: False)
    monkeypatch.setattr(hardware, "gpus", lambda: ["Tesla T4, 15 GiB"])
    monkeypatch.setattr(hardware, "device_memory", lambda: 15 * 2**30)
    monkeypatch.setattr(hardware, "bitsandbytes_available", lambda: (True, ""))
    dtype_form = ModelPanel(config=ui_config).forms[0]
    assert "bfloat16" not in dtype_form.controls["model.compute_dtype"].options
    assert "not supported on this GPU" in dtype_form.notes["model.compute_dtype"].value
    assert "fp16 with loss scaling" in dtype_form.notes["model.compute_dtype"].value
