"""Experiment trackers (train.report_to): transformers' own TensorBoard and MLflow callbacks,
writing inside the run folder with no server. TensorBoard's event files go to
output_dir/tensorboard, MLflow's runs to an SQLite store, output_dir/mlflow.db."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from ..config import TrainConfig
from ..errors import UserError

# The modules each tracker needs (each the name of its pip package too). torch's SummaryWriter,
# which transformers' TensorBoard callback uses, needs the tensorboard package itself.
NEEDS = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",)}
# MLflow 3 refuses its old file store unless told otherwise, so the local store is SQLite:
# the full mlflow package brings these two, mlflow-skinny does not.
LOCAL_MLFLOW_STORE = ("sqlalchemy", "alembic")


def report_to(cfg: TrainConfig) -> list[str]:
    """TrainingArguments.report_to: the chosen tracker, or none at all."""
    return [] if cfg.report_to == "none" else [cfg.report_to]


def missing(cfg: TrainConfig) -> list[str]:
    """The modules the chosen tracker needs that are not installed here."""
    needs = NEEDS.get(cfg.report_to, ())
    if cfg.report_to == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        needs += LOCAL_MLFLOW_STORE  # no store of the user's own: ours is local
    return [module for module in needs if importlib.util.find_spec(module) is None]


def install_hint(cfg: TrainConfig) -> str:
    """The pip command that brings what the chosen tracker lacks here; empty when nothing is missing."""
    absent = missing(cfg)
    if not absent:
        return ""
    # The tracker's own package brings the rest (mlflow brings SQLAlchemy and Alembic).
    return "pip install " + (cfg.report_to if cfg.report_to in absent else " ".join(absent))


def check(cfg: TrainConfig) -> None:
    """Refuse, in one line and before any model loads, a tracker whose package is absent."""
    hint = install_hint(cfg)
    if hint:
        raise UserError(f"train.report_to: {cfg.report_to} needs {', '.join(missing(cfg))}, not installed here: "
                        f"{hint}, or set train.report_to: none")


def point_tensorboard(trainer, cfg: TrainConfig) -> None:
    """Send TensorBoard's event files to output_dir/tensorboard. transformers 5 has no
    logging_dir argument: its callback writes under TENSORBOARD_LOGGING_DIR (a user's choice,
    kept) or the Trainer's output_dir (our checkpoints folder) otherwise."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(Path(cfg.output_dir) / "tensorboard")


def mlflow_uri(cfg: TrainConfig) -> str:
    return "sqlite:///" + str((Path(cfg.output_dir) / "mlflow.db").absolute())


@contextlib.contextmanager
def mlflow_store(cfg: TrainConfig):
    """For one training, MLflow's tracking URI is the run folder's store, unless the user chose
    one (MLFLOW_TRACKING_URI, mlflow.set_tracking_uri) or has a run open. Afterwards it is unset
    again: MLflow keeps it process-wide, and the next run in this process has its own folder."""
    if cfg.report_to != "mlflow":
        yield
        return
    import mlflow
    if mlflow.is_tracking_uri_set() or mlflow.active_run() is not None:
        yield
        return
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(mlflow_uri(cfg))
    status = "FINISHED"
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        close_mlflow(mlflow, status)


def close_mlflow(mlflow, status: str) -> None:
    """End the run training left open (transformers ends it only when training ends normally),
    and unset the URI, with the variable MLflow 3 set beside it."""
    if mlflow.active_run() is not None:
        mlflow.end_run(status)
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
