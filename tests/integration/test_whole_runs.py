"""Whole runs: the demo and MiniLM with the real built-in models (slow: minutes on a 2-core
CPU), the QLoRA preset shrunk, and the GPU check script run small here."""
import json

import pandas as pd
import pytest

from nb_finetune import RunConfig
from nb_finetune.cli import main
from nb_finetune.pipeline import run


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """`nb-finetune demo` on the built-in default: tuned beats the base model and the majority class."""
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data report:" in printed and "step" in printed and "test results:" in printed
    metrics = pd.read_csv(out / "test_metrics.csv", index_col="model")
    tuned, base = metrics.loc["tuned", "accuracy"], metrics.loc["base", "accuracy"]
    majority = metrics.filter(like="majority", axis=0)["accuracy"].iloc[0]
    assert tuned >= 0.8 and tuned > base + 0.1 and tuned > majority + 0.1
    history = pd.read_csv(out / "history.csv")
    assert history["val_loss"].dropna().iloc[-1] < history["train_loss"].iloc[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["data_report"]["split_sizes"] == {"train": 130, "validation": 30, "test": 40}
    assert RunConfig.load(out / "config.yaml").data.source == "imdb-sample"


@pytest.mark.slow
def test_minilm_classification_head_on_sst2(tmp_path, shared_data):
    train = pd.read_csv(shared_data / "sst2" / "train.tsv", sep="\t", quoting=3, dtype=str).sample(400, random_state=0)
    cfg = RunConfig.from_dict({
        "data": {"text_column": "sentence", "label_names": {"0": "negative", "1": "positive"},
                 "test_source": str(shared_data / "sst2" / "validation.tsv"), "val_fraction": 0.1},
        "model": {"name": "minilm-l6", "objective": "auto", "lora_r": 8, "lora_alpha": 16},
        "train": {"output_dir": str(tmp_path / "minilm"), "epochs": 3, "batch_size": 16, "learning_rate": 1e-3,
                  "max_length": 64, "eval_steps": 20},
        "eval": {"max_test_rows": 200}})
    session = run(cfg, progress=lambda m: None, source=train)
    assert session.objective == "head"
    m = session.eval_result.metrics
    assert list(m.index) == ["tuned", "majority class (positive)"] or list(m.index) == ["tuned", "majority class (negative)"]
    assert m.loc["tuned", "accuracy"] > 0.7  # chance is ~0.5 on SST-2 validation


def test_qlora_preset_runs_small(tiny_model_dir, tmp_path):
    """The shipped QLoRA preset, end to end on its built-in data, shrunk to a few steps."""
    pytest.importorskip("bitsandbytes")
    from nb_finetune import load_preset
    cfg = load_preset("qlora-gpu").with_overrides({
        "model.name": str(tiny_model_dir), "data.max_rows": 80, "train.max_steps": 2, "train.max_length": 64,
        "train.batch_size": 4, "train.grad_accum": 1, "train.output_dir": str(tmp_path / "q"),
        "eval.max_test_rows": 6, "eval.num_samples": 1, "eval.max_new_tokens": 4})
    s = run(cfg, progress=lambda m: None)
    assert s.prep.labels == ["yes", "no"]  # BoolQ's True/False, worded by the preset's asset defaults
    assert list(s.eval_result.metrics.index)[:2] == ["tuned", "base"]
    assert (tmp_path / "q" / "report.json").is_file()


@pytest.mark.slow
def test_gpu_check_script_runs_here(tmp_path):
    """The GPU check runs on this CPU too (small): ours and the TRL script side by side for each
    model, DPO and ORPO, the longest row, and a results file naming the machine."""
    import json
    import subprocess
    import sys

    from conftest import REPO, SUBPROCESS_ENV
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--steps", "2", "--output",
                           str(tmp_path)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["precision", "model", "trainer"])
    assert "tokens/s" in lines[header] and "peak MiB" in lines[header] and "val loss" in lines[header]
    assert [ln.split()[1:3] for ln in lines[header + 1:header + 5]] == [
        ["quality", "ours"], ["quality", "trl"], ["scale", "ours"], ["scale", "trl"]]
    assert any(ln.startswith("longest row that trains under the 15 GiB cap") for ln in lines)
    saved = json.loads(next(tmp_path.glob("gpu_check-cpu-*.json")).read_text())
    assert saved["machine"]["gpu"] is None and saved["longest"]["ours"] == 64
    assert [(r["model"], r["trainer"]) for r in saved["runs"]] == [
        ("quality", "ours"), ("quality", "trl"), ("scale", "ours"), ("scale", "trl"),
        ("preference", "ours dpo"), ("preference", "ours orpo")]
    preference = [r for r in saved["runs"] if r["model"] == "preference"]
    assert all(r["fits"] and r["peak MiB"] > 0 and 0 <= r["val reward accuracy"] <= 1 for r in preference)
    quality = [r for r in saved["runs"] if r["model"] == "quality"]
    assert all(r["fits"] and r["val loss"] > 0 and r["peak MiB"] > 0 for r in quality)
    assert all(r["tokens/s"] > 0 for r in saved["runs"] if r["model"] == "scale")
