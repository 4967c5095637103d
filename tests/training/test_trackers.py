"""Experiment trackers (train.report_to): a tiny real run logs to TensorBoard or MLflow inside its
folder, and what the event files and the MLflow store hold is read back and matched against the
run's own history; a tracker whose package is missing is refused in one line before the model
loads; `none` reports nowhere."""
import os
import sys

import pandas as pd
import pytest
from conftest import prepared_session, tiny_run_config

from nb_finetune import UserError, modeling, pipeline
from nb_finetune.config import TrainConfig
from nb_finetune.training.policy import training_arguments


def tiny_run(tiny_model_dir, tmp_path, frame, **train):
    """4 steps (unless told), the loss logged at each, validation every 2."""
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"max_steps": 4, "eval_steps": 2} | train)
    return prepared_session(cfg, frame).train()


def assert_same_points(steps_values, history: pd.DataFrame, column: str):
    rows = history.dropna(subset=[column])
    assert [step for step, _ in steps_values] == rows["step"].tolist()
    assert [value for _, value in steps_values] == pytest.approx(rows[column].tolist(), rel=1e-6)


@pytest.fixture
def fresh_mlflow(monkeypatch):
    """No tracking URI chosen, before and after: MLflow keeps it process-wide."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_none_reports_nowhere():
    assert training_arguments(TrainConfig(), "float32", has_eval=True).report_to == []
    assert training_arguments(TrainConfig(report_to="tensorboard"), "float32", has_eval=True).report_to == \
        ["tensorboard"]


def test_tensorboard_event_files_hold_the_history(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    result = tiny_run(tiny_model_dir, tmp_path, sst2_frame, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["step"].tolist() == result.history["step"].tolist() == [1, 2, 3, 4]
    assert_same_points([(e.step, e.value) for e in events.Scalars("train/loss")], history, "train_loss")
    assert_same_points([(e.step, e.value) for e in events.Scalars("eval/loss")], history, "val_loss")
    assert not list((tmp_path / "run" / "checkpoints").glob("runs"))  # transformers' default place: unused


def test_mlflow_local_store_holds_the_history(tiny_model_dir, tmp_path, sst2_frame, fresh_mlflow):
    pytest.importorskip("sqlalchemy")
    result = tiny_run(tiny_model_dir, tmp_path, sst2_frame, report_to="mlflow")
    client = fresh_mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    [run] = client.search_runs(experiment_ids=["0"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert_same_points(sorted((m.step, m.value) for m in loss), result.history, "train_loss")
    val = client.get_metric_history(run.info.run_id, "eval_loss")
    assert_same_points(sorted((m.step, m.value) for m in val), result.history, "val_loss")
    # Unset again: the next run in this process gets a store of its own.
    assert not fresh_mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ


def test_a_users_own_mlflow_tracking_uri_wins(tiny_model_dir, tmp_path, sst2_frame, fresh_mlflow, monkeypatch):
    pytest.importorskip("sqlalchemy")
    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    result = tiny_run(tiny_model_dir, tmp_path, sst2_frame, report_to="mlflow", max_steps=2)
    [run] = fresh_mlflow.MlflowClient(theirs).search_runs(experiment_ids=["0"])
    assert len(fresh_mlflow.MlflowClient(theirs).get_metric_history(run.info.run_id, "loss")) == len(result.history)
    assert not (tmp_path / "run" / "mlflow.db").exists() and os.environ["MLFLOW_TRACKING_URI"] == theirs


@pytest.mark.parametrize("report_to, absent, install", [
    ("tensorboard", ["tensorboard"], "pip install tensorboard"),
    ("mlflow", ["mlflow", "sqlalchemy", "alembic"], "pip install mlflow"),  # mlflow brings the other two
    ("mlflow", ["sqlalchemy", "alembic"], "pip install sqlalchemy alembic"),  # mlflow-skinny alone
])
def test_a_missing_tracker_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, sst2_frame, monkeypatch,
                                                              report_to, absent, install):
    if report_to == "mlflow" and "mlflow" not in absent:
        pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)  # what find_spec answers for a module not installed

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the missing tracker was said")

    monkeypatch.setattr(modeling, "load_base", no_model)
    cfg = tiny_run_config(tiny_model_dir, tmp_path, report_to=report_to)
    for start in (lambda: pipeline.run(cfg, progress=lambda m: None, source=sst2_frame),
                  lambda: prepared_session(cfg, sst2_frame).train()):
        with pytest.raises(UserError) as err:
            start()
        message = str(err.value)
        assert "\n" not in message and f"train.report_to: {report_to} needs {', '.join(absent)}" in message
        assert f"{install}, or set train.report_to: none" in message


def test_the_whole_job_asks_for_the_tracker_once_before_the_data(tiny_model_dir, tmp_path, sst2_frame, monkeypatch):
    """pipeline.run checks the tracker once, before the data loads: the Session's setup asks, and
    its training knows the setting was checked. A setting changed afterwards is checked again."""
    from nb_finetune import data
    from nb_finetune.training import trackers
    calls, check, prepare = [], trackers.check, data.prepare
    monkeypatch.setattr(trackers, "check", lambda cfg: calls.append(cfg.report_to) or check(cfg))
    monkeypatch.setattr(data, "prepare", lambda *args: calls.append("data") or prepare(*args))
    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=1, eval_steps=1)
    session = pipeline.run(cfg, progress=lambda m: None, source=sst2_frame)
    assert calls == ["none", "data"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    session.reconfigure(cfg.with_overrides({"train.report_to": "tensorboard"}))
    with pytest.raises(UserError, match="train.report_to: tensorboard needs tensorboard"):
        session.train()
    assert calls == ["none", "data", "tensorboard"]


def test_mlflow_needs_no_local_store_when_the_user_has_a_server(monkeypatch):
    from nb_finetune.training import trackers
    # MLflow decides at import whether it can open sqlite stores, for the whole process: import
    # it before hiding SQLAlchemy, or a later test in this worker finds no sqlite store.
    pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert trackers.missing(TrainConfig(report_to="mlflow")) == []
    assert trackers.missing(TrainConfig(report_to="none")) == []


def test_a_training_that_fails_leaves_no_mlflow_run_open_and_no_uri(tmp_path, fresh_mlflow):
    """transformers ends its MLflow run only when training ends normally: the next training in
    this process must not log into the failed one's run, or its store."""
    pytest.importorskip("sqlalchemy")
    from nb_finetune.training import trackers
    cfg = TrainConfig(report_to="mlflow", output_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="boom"), trackers.mlflow_store(cfg):
        run_id = fresh_mlflow.start_run().info.run_id  # what the callback does at train begin
        raise RuntimeError("boom")
    assert fresh_mlflow.active_run() is None and not fresh_mlflow.is_tracking_uri_set()
    assert fresh_mlflow.MlflowClient(trackers.mlflow_uri(cfg)).get_run(run_id).info.status == "FAILED"
