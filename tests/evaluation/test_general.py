"""The cost in general ability: the loss of base and tuned on rows training never saw, equal to
the model's own loss per token, kept for the base, and a general set that cannot be read
refused before training."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import alpaca

from nb_finetune import RunConfig, UserError
from nb_finetune.data import completion_sample
from nb_finetune.evaluation import EvalTarget, general_loss
from nb_finetune.pipeline import Session


def loaded_session(tiny_model_dir, tmp_path, shared_data) -> Session:
    cfg = RunConfig.from_dict({
        "data": {"source": str(shared_data / "alpaca_demo" / "alpaca_en_demo.json"), "task": "completion",
                 "max_rows": 40},
        "model": {"name": str(tiny_model_dir), "chat_template": "no"},
        "train": {"output_dir": str(tmp_path / "run"), "max_length": 64}})
    session = Session(cfg, progress=lambda m: None)
    session.load_model()
    return session


def test_the_general_loss_is_the_models_own_loss_per_token(tiny_model_dir, tmp_path, shared_data):
    s = loaded_session(tiny_model_dir, tmp_path, shared_data)
    rows = alpaca(shared_data, slice(500, 506))
    with torch.no_grad():  # the adapter moved off zero, so tuned and base differ
        for name, p in s.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    target = EvalTarget(s.model, s.formatter, batch_size=4, progress=lambda m: None)
    table = general_loss(target, rows)
    features = s.formatter.encode_many(rows.to_dict("records"))
    expected = {}
    for name in ("tuned", "base"):
        total = tokens = 0.0
        for f in features:
            ids = torch.tensor([f["input_ids"]])
            labels = torch.tensor([f["labels"]])
            with torch.no_grad(), (s.model.disable_adapter() if name == "base" else torch.enable_grad()):
                loss = s.model(input_ids=ids, labels=labels).loss.item()
            n = int((labels[0, 1:] != -100).sum())
            total, tokens = total + loss * n, tokens + n
        expected[name] = total / tokens
    assert table.loc["tuned", "general_loss"] == pytest.approx(expected["tuned"], rel=1e-4)
    assert table.loc["base", "general_loss"] == pytest.approx(expected["base"], rel=1e-4)
    assert abs(table.loc["tuned", "general_loss"] - table.loc["base", "general_loss"]) > 1e-3
    for name in ("tuned", "base"):
        assert table.loc[name, "general_loss_low"] <= table.loc[name, "general_loss"] <= \
            table.loc[name, "general_loss_high"]
    assert target.base_results.results  # the base's loss kept for the next evaluation


def test_a_general_set_is_sampled_from_a_file_or_a_built_in(shared_data):
    path = str(shared_data / "alpaca_demo" / "alpaca_en_demo.json")
    rows = completion_sample(path, 25, seed=3)
    assert len(rows) == 25 and list(rows.columns) == ["prompt", "completion"]
    assert rows.equals(completion_sample(path, 25, seed=3))
    assert len(completion_sample("asdiv", 10)) == 10


def test_a_general_set_that_is_not_completions_stops_the_run_before_training(tiny_model_dir, tmp_path, shared_data,
                                                                            capsys):
    from nb_finetune.cli import main
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": str(shared_data / "alpaca_demo" / "alpaca_en_demo.json"), "task": "completion"},
        "model": {"name": str(tiny_model_dir)}, "train": {"output_dir": str(tmp_path / "run")},
        "eval": {"general_source": "imdb-sample"}}))
    code = main(["run", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "eval.general_source='imdb-sample'" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_general_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="eval.general_source=") as err:
        completion_sample(str(tmp_path / "nope.json"), 10)
    assert "\n" not in str(err.value)
