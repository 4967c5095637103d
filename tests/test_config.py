import json

import pytest
import yaml

from nb_finetune import ConfigError, RunConfig, UserError
from nb_finetune.config import DataConfig, TrainConfig, field_help, load_preset, presets


def test_defaults_validate_and_carry_help_text():
    RunConfig().validate()
    assert "LoRA rank" in field_help("model", "lora_r")
    import dataclasses
    for section in (DataConfig, TrainConfig):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = RunConfig().with_overrides({"train.learning_rate": 1e-3, "data.label_names": {"0": "no", "1": "yes"},
                                      "model.target_modules": "q_proj,v_proj", "data.column_names": ["a", "b"]})
    path = cfg.save(tmp_path / f"c{suffix}")
    if suffix == ".json":
        json.loads(path.read_text())
    else:
        yaml.safe_load(path.read_text())
    assert RunConfig.load(path) == cfg


def test_all_problems_reported_at_once():
    raw = {"train": {"learning_rate": -1, "batch_size": 0, "scheduler": "zigzag", "bogus": 1},
           "model": {"lora_r": "eight"}, "extra": {}}
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    problems = {p.field: p for p in err.value.problems}
    assert set(problems) == {"train.bogus", "model.lora_r", "extra", "train.learning_rate",
                             "train.batch_size", "train.scheduler"}
    assert "'linear'" in problems["train.scheduler"].accepted
    assert problems["train.batch_size"].value == 0
    assert "6 problems" in str(err.value)


def test_yaml_scientific_notation_string_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n")  # YAML 1.1 reads this as a string
    assert RunConfig.load(path).train.learning_rate == pytest.approx(2e-4)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        RunConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        RunConfig.load(bad)
    code = tmp_path / "code.yaml"
    code.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError):
        RunConfig.load(code)  # safe_load refuses to build Python objects


def test_overrides_name_unknown_settings():
    with pytest.raises(ConfigError, match="train.nope"):
        RunConfig().with_overrides({"train.nope": 1})


@pytest.mark.parametrize("name", presets())
def test_presets_load_validate_and_round_trip(name, tmp_path):
    cfg = load_preset(name)
    assert RunConfig.load(cfg.save(tmp_path / "p.yaml")) == cfg
    from nb_finetune import assets
    assert cfg.data.source in assets.BUILTIN, "shipped presets run offline on built-in data"
    assert cfg.model.name in assets.BUILTIN


def test_shipped_presets():
    assert {"demo", "qlora-gpu"} <= set(presets())
    q = load_preset("qlora-gpu").model
    assert (q.quantization, q.quant_type, q.double_quant) == ("4bit", "nf4", True)


ON_OFF_YAML = ("train:\n  cpu_kernels: off\n  liger_kernel: on\n  padding_free: off\n  gradient_checkpointing: no\n"
               "model:\n  chat_template: yes\n")
ON_OFF_WORDS = {"train.cpu_kernels": "off", "train.liger_kernel": "on", "train.padding_free": "off",
                "train.gradient_checkpointing": "no", "model.chat_template": "yes"}


def _words(cfg: RunConfig) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in ON_OFF_WORDS}


def test_on_and_off_written_in_a_yaml_file_are_the_words(tmp_path):
    """YAML 1.1 reads on/off and yes/no as booleans; the fields offering those words take them."""
    path = tmp_path / "c.yaml"
    path.write_text(ON_OFF_YAML)
    assert yaml.safe_load(ON_OFF_YAML)["train"]["cpu_kernels"] is False  # what the file gives
    cfg = RunConfig.load(path)
    assert _words(cfg) == ON_OFF_WORDS
    assert RunConfig.load(cfg.save(tmp_path / "again.yaml")) == cfg


def test_on_and_off_from_python_are_the_words():
    assert TrainConfig(cpu_kernels=False, liger_kernel=True).cpu_kernels == "off"
    assert TrainConfig(liger_kernel=True).liger_kernel == "on"
    bools = {key: word in ("on", "yes") for key, word in ON_OFF_WORDS.items()}
    assert _words(RunConfig().with_overrides(bools)) == ON_OFF_WORDS
    with pytest.raises(ConfigError, match="train.cpu_kernels='on': one of 'auto', 'off'"):
        RunConfig.from_dict({"train": {"cpu_kernels": True}})  # a word the field does not offer, named
    with pytest.raises(ConfigError, match="train.packing=.*a value of type bool"):
        RunConfig.from_dict({"train": {"packing": "off"}})  # a plain bool field is unchanged
