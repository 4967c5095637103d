"""Notebook panels over the engine: each works alone or inside `Studio`.

    from nb_finetune.ui import Studio
    Studio()                      # the built-in demo, every stage in tabs
    DataPanel(data=my_frame)      # one stage alone
"""
from ..quiet import quiet_notices

quiet_notices()  # before the panels import peft, and with it bitsandbytes, which logs as it loads

from .common import Shared  # noqa: E402
from .data_panel import DataPanel  # noqa: E402
from .eval_panel import EvalPanel  # noqa: E402
from .export_panel import ExportPanel  # noqa: E402
from .model_panel import ModelPanel  # noqa: E402
from .probe_panel import ProbePanel  # noqa: E402
from .runs_panel import RunsPanel  # noqa: E402
from .studio import Studio  # noqa: E402
from .tokens_panel import TokenizationPanel  # noqa: E402
from .train_panel import TrainPanel  # noqa: E402

__all__ = ["Shared", "Studio", "DataPanel", "TokenizationPanel", "ModelPanel", "TrainPanel", "EvalPanel",
           "ProbePanel", "ExportPanel", "RunsPanel"]
