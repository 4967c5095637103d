"""Notebook panels over the engine: each works alone or inside `Studio`.

    from nb_finetune.ui import Studio
    Studio()                      # the built-in demo, every stage in tabs
    DataPanel(data=my_frame)      # one stage alone
"""
from ..quiet import loading_quietly

with loading_quietly():  # the panels import peft, and with it bitsandbytes, which logs as it loads
    from .common import Shared
    from .data_panel import DataPanel
    from .eval_panel import EvalPanel
    from .export_panel import ExportPanel
    from .model_panel import ModelPanel
    from .probe_panel import ProbePanel
    from .runs_panel import RunsPanel
    from .studio import Studio
    from .tokens_panel import TokenizationPanel
    from .train_panel import TrainPanel

__all__ = ["Shared", "Studio", "DataPanel", "TokenizationPanel", "ModelPanel", "TrainPanel", "EvalPanel",
           "ProbePanel", "ExportPanel", "RunsPanel"]
