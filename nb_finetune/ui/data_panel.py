"""Data: pick a source, map its columns, load it and read the validation report (for preference
pairs, the pair checks and the length-bias figure)."""
from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from .. import assets
from ..data.bias_scan import DEFAULT_GROUPS
from ..render import figures, tables
from ..render.html import bias_scan_tables
from .common import Form, Panel, Picture

SOURCE_KEYS = ["data.task", "data.format", "data.skip_bad_lines"]
COLUMN_KEYS = ["data.text_column", "data.text_template", "data.label_column", "data.label_names",
               "data.prompt_column", "data.completion_column", "data.messages_column", "data.chosen_column",
               "data.rejected_column", "data.instruction"]
MITIGATION_KEYS = ["data.scan_groups", "data.counterfactual", "data.counterfactual_terms", "data.reweight_groups"]
SPLIT_KEYS = ["data.max_rows", "data.val_fraction", "data.test_fraction", "data.test_source",
              "data.drop_duplicates", "data.seed"]


class DataPanel(Panel):
    """Load and check a data set: a built-in name, a file path, a Hub id, or `data=` a DataFrame."""

    title = "Data"

    def __init__(self, shared=None, config=None, data=None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        builtin = [a["name"] for a in assets.listing() if a["kind"] == "data"]
        self.source = widgets.Combobox(options=builtin, value=str(self.shared.get("data.source")),
                                       description="source", ensure_option=False,
                                       placeholder="built-in name, file path or Hub id", continuous_update=False,
                                       style={"description_width": "150px"}, layout=widgets.Layout(width="420px"))
        self.source.observe(self._source_typed, names="value")
        self.source_note = widgets.HTML()
        if self.shared.source is not None:
            self._show_frame_source(self.shared.source)
        self.forms = [Form(self.shared, SOURCE_KEYS), Form(self.shared, COLUMN_KEYS), Form(self.shared, SPLIT_KEYS),
                      Form(self.shared, MITIGATION_KEYS)]
        self.load_button = self.button("Load and check", self.load, "primary", "table")
        self.report = widgets.HTML()
        self.balance_image = Picture("The class balance appears here once the data is loaded (for pairs: their "
                                     "length bias).")
        self.length_image = Picture("Tokens per row appear here once the data is loaded and tokenized.")
        self.splits = widgets.HTML()
        self.scan_text = widgets.HTML()
        self.scan_image = Picture("Label shares by group appear here once labelled data is loaded.")
        self.scan_terms = widgets.HTML()
        # Disabled until a scan finds a group that differs: each applies a fix and scans again.
        self.counterfactual_button = self.button("Add gender-swapped copies and scan again", self.add_counterfactual,
                                                 icon="exchange", waits=self.load_button)
        self.reweight_button = self.button("Balance group sizes and scan again", self.balance_groups,
                                           icon="balance-scale", waits=self.load_button)
        self.rows = widgets.HTML()
        settings = widgets.Accordion(children=[f.widget for f in self.forms[1:]])
        for i, name in enumerate(["columns", "rows and split", "bias scan and mitigation (training rows only)"]):
            settings.set_title(i, name)
        settings.selected_index = None
        self.children = [widgets.HBox([self.source, self.source_note]), self.forms[0].widget, settings,
                         widgets.HBox([self.load_button]), self.status, self.error, self.warnings,
                         self.report, widgets.HBox([self.balance_image, self.length_image],
                                                   layout=widgets.Layout(align_items="flex-start")), self.splits,
                         self.scan_text, self.scan_image, self.scan_terms,
                         widgets.HBox([self.counterfactual_button, self.reweight_button]), self.rows]
        self._show_scan(None)

    def _source_typed(self, change) -> None:
        # While a DataFrame is used the box names it, and that name is no setting.
        if not self.source.disabled:
            self.shared.set("data.source", change["new"])

    def _show_frame_source(self, frame) -> None:
        self.source.disabled = True
        n = len(frame)
        self.source.value = f"DataFrame ({n:,} rows)"
        self.source_note.value = (f"<span style='color:#444'>used instead of data.source; columns "
                                  f"{', '.join(map(str, getattr(frame, 'columns', [])))}</span>")

    def set_data(self, frame: pd.DataFrame) -> None:
        """Use an in-memory DataFrame instead of the source named in the settings."""
        self.shared.set_source(frame)
        self._show_frame_source(frame)

    def load(self) -> None:
        session = self.session()
        prep = session.prepare_data()
        self._show(prep, None)
        self.shared.notify("data")
        # Token lengths need the tokenizer; the report is already shown if that fails.
        session.tokenize()
        self._show(prep, session)
        self.say(f"loaded {sum(prep.report.split_sizes.values()):,} rows and checked them")
        self.shared.notify("tokens")

    def _show(self, prep, session) -> None:
        report = prep.report
        self.report.value = tables.report_html(report.checks)
        if report.class_balance is not None:
            self.balance_image.show(figures.class_balance_figure(report.class_balance))
        elif report.pair_lengths is not None:  # preference pairs: is chosen the longer?
            self.balance_image.show(figures.pair_lengths_figure(report.pair_lengths))
        else:
            self.balance_image.clear()  # a task without classes: no earlier data set's balance
        if session is not None and report.token_lengths is not None:
            self.length_image.show(figures.token_length_figure(report.token_lengths, report.max_length))
        else:
            self.length_image.clear()  # until this data set is tokenized
        self.splits.value = "<b>split</b>: " + ", ".join(f"{k} {v:,}" for k, v in report.split_sizes.items())
        self.rows.value = "<b>first training rows</b>" + tables.table_html(prep.splits["train"].head(5))
        self._show_scan(report)

    def _show_scan(self, report) -> None:
        """The bias scan of the rows that will be trained on, and the fixes it calls for."""
        found = None if report is None else report.bias_scan
        if report is not None and report.bias_scan_mitigated is not None:
            found = report.bias_scan_mitigated
        self.scanned = None if report is None else report.bias_scan  # the rows before any fix
        self.flagged = found.flagged if found is not None else pd.DataFrame(columns=["axis", "group"])
        self.counterfactual_button.disabled = "gender" not in set(self.flagged["axis"]) \
            or bool(self.shared.get("data.counterfactual"))
        self.reweight_button.disabled = self.axis_to_balance() is None
        if found is None:
            self.scan_text.value = "<span style='color:#888'>The bias scan of the training rows appears here.</span>"
            self.scan_terms.value = ""
            return self.scan_image.clear()
        before = "" if found is report.bias_scan else f" (before mitigation: {len(report.bias_scan.flagged)} differed)"
        self.scan_text.value = f"<b>{html.escape(found.headline())}</b>{html.escape(before)}"
        if found.has_shares:
            self.scan_image.show(figures.bias_scan_figure(found))
        else:
            self.scan_image.clear()
        self.scan_terms.value = bias_scan_tables(found)

    def axis_to_balance(self) -> str | None:
        """The first axis with a group that differs and two or more groups to balance."""
        if self.scanned is None:
            return None
        mentioned = self.scanned.groups[self.scanned.groups["rows"] > 0]
        for axis in dict.fromkeys(self.flagged["axis"]):
            if (mentioned["axis"] == axis).sum() >= 2:
                return axis
        return None

    def add_counterfactual(self) -> None:
        self.counterfactual_button.disabled = self.reweight_button.disabled = True  # until the scan says
        self.shared.set("data.counterfactual", True)  # with the built-in he/she pairs unless terms are set
        self.load()

    def balance_groups(self) -> None:
        axis = self.axis_to_balance()
        self.counterfactual_button.disabled = self.reweight_button.disabled = True  # until the scan says
        groups = self.scanned.groups
        named = groups[(groups["axis"] == axis) & (groups["rows"] > 0)]["group"]
        terms = (self.shared.get("data.scan_groups") or DEFAULT_GROUPS)[axis]
        self.shared.set("data.reweight_groups", {g: list(terms[g]) for g in named})
        self.load()
