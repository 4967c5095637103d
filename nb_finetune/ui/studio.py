"""The studio: every panel in tabs over one shared session, in the order of the job."""
from __future__ import annotations

import ipywidgets as widgets

from .common import Shared
from .data_panel import DataPanel
from .eval_panel import EvalPanel
from .export_panel import ExportPanel
from .model_panel import ModelPanel
from .probe_panel import ProbePanel
from .runs_panel import RunsPanel
from .tokens_panel import TokenizationPanel
from .train_panel import TrainPanel


class Studio(widgets.VBox):
    """`Studio()` uses the built-in demo; `Studio(config="run.yaml", data=frame)` your own.

    `config`: a RunConfig, a dict, a preset name or a YAML/JSON path. `data`: a DataFrame used
    instead of data.source. `foreground`: run training on the main thread (default: on Colab only).
    `shared`: settings and session to share with other panels (as `%finetune` does)."""

    def __init__(self, config=None, data=None, foreground: bool | None = None, shared: Shared | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.shared = shared or Shared(config, data)
        self.data = DataPanel(self.shared)
        self.tokens = TokenizationPanel(self.shared)
        self.model = ModelPanel(self.shared)
        self.train = TrainPanel(self.shared, foreground=foreground)
        self.evaluation = EvalPanel(self.shared, foreground=foreground)
        self.probe = ProbePanel(self.shared)
        self.export = ExportPanel(self.shared)
        self.runs = RunsPanel(self.shared, foreground=foreground)
        self.panels = [self.data, self.tokens, self.model, self.train, self.evaluation, self.probe, self.export,
                       self.runs]
        self.tabs = widgets.Tab(children=self.panels)
        for i, panel in enumerate(self.panels):
            self.tabs.set_title(i, panel.title)
        self.shared.observe(self._follow)
        self.children = [widgets.HTML("<h3 style='margin:4px 0'>nb_finetune studio</h3>"), self.tabs]

    def _follow(self, event: str) -> None:
        # Show the result the user is waiting for: the test appears when training ends; a run
        # to resume (chosen in the Runs tab) waits for Start in the Train tab.
        if event == "eval":
            self.tabs.selected_index = self.panels.index(self.evaluation)
        elif event == "resume":
            self.tabs.selected_index = self.panels.index(self.train)
