"""No one else's code runs, and no access token is written anywhere."""
import json
import shutil

import pytest

from nb_finetune import RunConfig, UserError
from nb_finetune.cli import main
from nb_finetune.config import ModelConfig
from nb_finetune.modeling import load_base, load_config
from nb_finetune.pipeline import Session

TOKEN = "hf_" + "Q3xZ9" * 7  # shaped like a real Hugging Face token


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        load_base(ModelConfig(name=str(folder)), "completion")
    model = load_base(ModelConfig(name=str(folder), allow_pickle=True), "completion")
    assert model.config.num_hidden_layers == 2


def test_remote_code_is_not_run_by_default(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom'\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    cfg["model_type"] = "custom"  # a type transformers does not know: only the shipped code could build it
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="ships its own Python code.*trust_remote_code: true"):
        load_config(ModelConfig(name=str(folder)))
    assert not marker.exists()


def test_tokens_never_written(monkeypatch, tmp_path, sst2_frame):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("MY_SERVICE_API_KEY", "s3cr3t-value-42")
    cfg = RunConfig().with_overrides({"train.output_dir": str(tmp_path / "out"), "data.text_column": "sentence",
                                      "data.instruction": f"Classify. (token {TOKEN}, key s3cr3t-value-42)"})
    saved = cfg.save(tmp_path / "exported.yaml").read_text()
    assert TOKEN not in saved and "s3cr3t-value-42" not in saved and "***" in saved
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(sst2_frame)
    out = session.write_outputs()
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert TOKEN not in text and "s3cr3t-value-42" not in text, path.name


def test_tokens_kept_out_of_error_messages(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: nowhere/{TOKEN}.csv\n")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and TOKEN not in err


def test_a_run_writes_only_under_its_output_folder(monkeypatch, tmp_path, tiny_model_dir, sst2_frame):
    """Train, evaluate and write reports from a config whose data and model live beside the
    output folder: every file created or changed in that tree is under train.output_dir."""
    import os
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "reviews.csv"
    sst2_frame.to_csv(data, index=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths resolve here

    def files():
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    cfg = RunConfig.from_dict({
        "data": {"source": os.path.relpath(data, work), "text_column": "sentence"},
        "model": {"name": str(model), "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": "runs/mine", "max_steps": 2, "batch_size": 4, "eval_steps": 2, "max_length": 64},
        "eval": {"num_samples": 1, "max_new_tokens": 2, "max_test_rows": 8}})
    session = Session(cfg, progress=lambda m: None)
    session.train()
    session.evaluate()
    session.write_outputs()
    out = (work / "runs" / "mine").resolve()
    changed = [p for p, stamp in files().items() if before.get(p) != stamp]
    assert changed and all(p.resolve().is_relative_to(out) for p in changed), \
        [str(p) for p in changed if not p.resolve().is_relative_to(out)]
