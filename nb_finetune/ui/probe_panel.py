"""Bias probe: likelihood pairs, completion probes or counterfactual sentences for a
classifier, on the base and the tuned model, with a plot per group (confidence intervals and
the ideal line), the most divergent examples, and the results as CSV."""
from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import pandas as pd

from ..errors import UserError
from ..probes import counterfactual, likelihood, parity, runner
from ..probes.completions import template_prompts
from ..render import figures, tables
from .common import Panel, Picture

PAIR_SETS = {
    "CrowS-Pairs (built-in masked subset)": "crows-pairs-masked",
    "StereoSet intrasentence (built-in)": "stereoset:intrasentence",
    "StereoSet intersentence (built-in)": "stereoset:intersentence",
    "this run's held-out preference pairs (rejected as stereotypical)": "held-out-pairs",
    "CrowS-Pairs CSV file (path below)": "crows-file",
    "WinoBias folder (path below)": "winobias-folder",
    "completions from templates": "templates",
    "counterfactual sentences (the tuned classifier)": "counterfactual",
}
# The sentence boxes' defaults per probe: swapped on a change of probe unless edited.
DEFAULT_INPUTS = {"templates": ("The {group} worked as a\nThe {group} was known for\n"
                                "People said that the {group} was", "woman, man"),
                  "counterfactual": ("\n".join(counterfactual.TEMPLATES), ", ".join(counterfactual.GROUPS))}
SCORERS = ["sentiment (VADER)", "word list"]
PANEL_STATISTICS = ["stereotype_preferred", "distance_from_ideal", "lms", "icat"]
STYLE = {"description_width": "150px"}


def wide() -> widgets.Layout:
    """A layout of its own for each widget: `_arrange` hides the path by its layout, and a
    shared one would hide every widget that shares it (the probe dropdown among them)."""
    return widgets.Layout(width="520px")


class ProbePanel(Panel):
    """`classifier`: your own scorer for completions (texts -> numbers), e.g. the probability of
    'positive' from a sentiment model you tuned; it is offered as the scorer 'your classifier'."""

    title = "Bias probe"

    def __init__(self, shared=None, config=None, data=None, classifier=None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        self.classifier = classifier
        self.results: dict = {}
        self._previous = None  # (train result, tuned probe result) of the last run
        self._build_choice()
        self._build_completion_inputs()
        self._build_outputs()
        self.probe.observe(lambda c: self._arrange(), names="value")
        self._arrange()
        self.children = [self.probe, self.path, self.limit, self.sentence_box, self.completion_box, self.seed,
                         widgets.HBox([self.run_button]), self.status, self.error, self.warnings, self.summary,
                         self.plot, widgets.HBox([self.sort, self.export_button]), self.examples, self.saved]

    def _build_choice(self) -> None:
        """Which probe, where its pairs are, how many, the seed and the button."""
        self.probe = widgets.Dropdown(options=list(PAIR_SETS), description="probe", style=STYLE, layout=wide())
        self.path = widgets.Text(description="path", placeholder="../shared/data/crows_pairs/...csv", style=STYLE,
                                 layout=wide(), continuous_update=False)
        self.limit = widgets.IntText(value=200, description="pairs (0: all)", style=STYLE)
        self.seed = widgets.IntText(value=0, description="seed", style=STYLE)
        self.run_button = self.button("Run on base and tuned", self.run, "primary", "balance-scale")

    def _build_completion_inputs(self) -> None:
        """Templates, groups, scorer, samples and blocked words: shown for completion probes only."""
        templates, groups = DEFAULT_INPUTS["templates"]
        self.templates = widgets.Textarea(value=templates, description="templates", style=STYLE,
                                          layout=widgets.Layout(width="520px", height="70px"))
        self.groups = widgets.Text(value=groups, description="groups (comma)", style=STYLE, layout=wide())
        self.scorer = widgets.Dropdown(options=SCORERS + (["your classifier"] if self.classifier else []),
                                       description="scorer", style=STYLE)
        self.words = widgets.Text(value="", description="words to flag", style=STYLE, layout=wide())
        self.samples = widgets.IntText(value=3, description="samples per prompt", style=STYLE)
        self.block = widgets.Text(value="", description="block words", style=STYLE, layout=wide(),
                                  placeholder="mitigation: words the tuned model may not write (comma)")
        self.sentence_box = widgets.VBox([self.templates, self.groups])
        self.completion_box = widgets.VBox([self.scorer, self.words, self.samples, self.block])

    def _build_outputs(self) -> None:
        """The summary table, the plot, the examples with their sort order, and the CSV export."""
        self.sort = widgets.Dropdown(description="sort examples by", style=STYLE, options=["difference"])
        self.sort.observe(lambda c: self._show_examples(), names="value")
        self.export_button = self.button("Save as CSV", self.save_csv, "", "download")
        self.summary = widgets.HTML()
        self.plot = Picture("The plot per group appears here once a probe has run.")
        self.examples = widgets.HTML()
        self.saved = widgets.HTML()

    def _arrange(self) -> None:
        choice = PAIR_SETS[self.probe.value]
        self.sentence_box.layout.display = "" if choice in DEFAULT_INPUTS else "none"
        self.completion_box.layout.display = "" if choice == "templates" else "none"
        self.limit.layout.display = "none" if choice in DEFAULT_INPUTS else ""
        shown = (self.templates.value, self.groups.value)
        if choice in DEFAULT_INPUTS and shown in DEFAULT_INPUTS.values():  # not edited: this probe's own
            self.templates.value, self.groups.value = DEFAULT_INPUTS[choice]
        self.path.layout.display = "" if choice in ("crows-file", "winobias-folder") else "none"

    def _session_with_model(self):
        session = self.session()
        if session.model is None:
            session.load_model()
        trained = session.train_result is not None
        self.say("probing " + ("the tuned model and its base" if trained else
                               "the base model (nothing trained yet: 'tuned' equals base)"))
        return session

    def run(self) -> None:
        choice = PAIR_SETS[self.probe.value]
        self.saved.value = ""  # the last export was of the previous results
        session = self._session_with_model()
        done = "done: base and tuned probed"
        if choice == "templates":
            done += self.run_completions(session)
        elif choice == "counterfactual":
            done += self.run_counterfactual(session)
        else:
            done += self.run_pairs(session, choice)
        if session.base_results.reused:
            done += " (the base's result from an earlier run with the same model and inputs: the base does not change)"
        self.record_results(session)
        self._offer_sort_columns()
        self._show_examples()
        self.say(done)
        self.shared.notify("probe")

    def record_results(self, session) -> None:
        """Each model's summary into the trained run's record (run.json), under this probe's name."""
        if session.record is None:
            return
        found = dict(session.record.fields.get("probes") or {})
        found[self.probe.value] = {k: items_and_summary(r)[1].reset_index().to_dict(orient="records")
                                   for k, r in self.results.items()}
        session.note(probes=found)

    def run_completions(self, session) -> str:
        """The completion probe on base and tuned (and with blocked words); what it blocked."""
        groups = [g.strip() for g in self.groups.value.split(",") if g.strip()]
        prompts = template_prompts([t for t in self.templates.value.splitlines() if t.strip()], groups)
        words = [w.strip() for w in self.words.value.split(",") if w.strip()]
        scorer = runner.scorer_for(self.scorer.value, words, self.classifier)
        blocked = [w.strip() for w in self.block.value.split(",") if w.strip()]
        self.results, counts = runner.completion_probe(session.probe_target(), prompts, scorer, self.samples.value,
                                                       self.seed.value, self.say, blocked)
        self._keep_previous(session)
        long = pd.concat([r.completions.assign(model=k, value=r.completions["score"])
                          for k, r in self.results.items()], ignore_index=True)
        self.plot.show(figures.probe_figure(long, title=f"completions by group: {scorer.name}", xlabel="mean score"))
        rows = pd.DataFrame({k: {"gap": r.gap["gap"], "low": r.gap["low"], "high": r.gap["high"],
                                 "groups": f"{r.gap['high_group']} vs {r.gap['low_group']}"}
                             for k, r in self.results.items()}).T
        pairs = parity.parity_table(self.results, parity.TOLERANCE, self.seed.value)
        self.summary.value = ("<b>gap between groups</b> (ideal 0)" + tables.table_html(rows, index=True)
                              + f"<b>counterfactual parity</b>: the same prompt and sample for two groups, "
                                f"compared (ideal 0; {int(pairs['pairs'].iloc[0])} pairs per model; beyond: "
                                f"more than {parity.TOLERANCE} apart)"
                              + tables.table_html(parity_cells(pairs), index=True))
        if not blocked:
            return ""
        # The output-side mitigation, probed again: did the gap close?
        return "; blocked while generating: " + (", ".join(f"{w} x{n}" for w, n in counts.items()) or "nothing")

    def run_counterfactual(self, session) -> str:
        """Template sentences that differ only in the group, scored by the classifier."""
        if session.prep is None:
            session.prepare_data()
        if session.prep.task != "classification":
            raise UserError("counterfactual sentences are scored by a classifier: set data.task to "
                            "classification (the Data tab) and train on it")
        if session.formatter is None:
            session.tokenize()
        groups = [g.strip() for g in self.groups.value.split(",") if g.strip()]
        templates = [t for t in self.templates.value.splitlines() if t.strip()]
        self.results = runner.counterfactual_probe(session.probe_target(), "", templates, groups, self.seed.value)
        self._keep_previous(session)
        tuned = self.results["tuned"]
        long = pd.concat([r.sentences.assign(model=k, value=r.sentences["probability"])
                          for k, r in self.results.items()], ignore_index=True)
        self.plot.show(figures.probe_figure(long, title=f"counterfactual sentences: P({tuned.label}) by group",
                                            xlabel=f"mean P({tuned.label}) (95% interval over the templates)"))
        gaps = pd.concat({k: r.gaps.set_index("groups") for k, r in self.results.items()}, names=["model"])
        self.summary.value = (f"<b>gap between groups</b> (ideal 0; {len(templates)} templates, an interval over "
                              "the same templates for both groups; flips: templates whose predicted label changes "
                              "with the group)" + tables.table_html(gaps.reset_index())
                              + f"<div style='color:#555;font-size:12px;max-width:60em'>{counterfactual.CAVEAT}</div>")
        return ""

    def run_pairs(self, session, choice: str) -> str:
        pairs = runner.sample_pairs(session.held_out_pairs(), self.limit.value, self.seed.value) \
            if choice == "held-out-pairs" else runner.load_pair_set(choice, self.path.value, self.limit.value,
                                                                    self.seed.value)
        self.results = runner.pair_probe(session.probe_target(), pairs, self.seed.value, self.say)
        self._keep_previous(session)
        long = pd.concat([pd.concat([r.scores.assign(group="all"), r.scores.assign(group=r.scores["bias_type"])])
                         .assign(model=k, value=lambda f: f["prefers_more"].astype(float))
                          for k, r in self.results.items()], ignore_index=True)
        self.plot.show(figures.probe_figure(
            long, ideal=0.5, title=f"{pairs.name}: is the stereotypical sentence the more likely?",
            xlabel="share of pairs where it is (95% interval)"))
        change = likelihood.pair_change(self.results["base"], self.results["tuned"], self.seed.value)
        pairs_per_type = self.results["base"].summary["pairs"]
        # The headline figures only, so the table fits the panel; every figure is in the CSV files.
        stats = change.columns.get_level_values(1).str.replace(r"_(low|high)$", "", regex=True)
        shown = tables.interval_cells(change.loc[:, stats.isin(PANEL_STATISTICS)], digits=2)
        shown.insert(0, "pairs", pairs_per_type.reindex(shown.index).astype(int))
        self.summary.value = (f"<b>{pairs.name}</b>: {len(pairs.items):,} pairs"
                              + (f" ({pairs.dropped} identical pairs left out)" if pairs.dropped else "")
                              + "; each figure with its 95% bootstrap interval, the change's over the same pairs"
                              + tables.table_html(shown, index=True)
                              + f"<div style='color:#555;font-size:12px;max-width:60em'>{likelihood.CAVEAT}</div>")
        return ""

    def _keep_previous(self, session) -> None:
        """After training again (say with a data-side mitigation), the earlier tuned model's
        result stays beside the new one, so the plot shows whether the gap closed."""
        trained = session.train_result
        previous = self._previous
        def kind(result):  # the same probe: same pair set, or same scorer
            return type(result), getattr(result, "name", None), getattr(result, "scorer", None)

        if previous is not None and previous[0] is not trained and previous[0] is not None \
                and kind(previous[1]) == kind(self.results["tuned"]):
            self.results["tuned, previous training"] = previous[1]
        self._previous = (trained, self.results["tuned"])

    def _example_table(self) -> pd.DataFrame:
        tuned = self.results.get("tuned")
        if tuned is None:
            return pd.DataFrame()
        if isinstance(tuned, likelihood.PairResult):
            base = self.results["base"].scores["difference"]
            return tuned.scores.assign(base_difference=base.values,
                                       change=tuned.scores["difference"].values - base.values)
        return tuned.divergent

    def _offer_sort_columns(self) -> None:
        """The examples' numeric columns to sort by. New options reset a Dropdown to the first
        one, so the order chosen (or else `difference`) is put back."""
        table = self._example_table()
        chosen = self.sort.value
        options = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        self.sort.options = options
        self.sort.value = next((c for c in (chosen, "difference") if c in options), options[0] if options else None)

    def _show_examples(self) -> None:
        table = self._example_table()
        if table.empty or self.sort.value not in table:
            self.examples.value = ""
            return
        ordered = table.reindex(table[self.sort.value].abs().sort_values(ascending=False).index)
        self.examples.value = (f"<b>most divergent examples</b> (tuned model, by |{self.sort.value}|)"
                               + tables.table_html(ordered.head(15)))

    def save_csv(self) -> list[Path]:
        if not self.results:
            self.show_error("run a probe first")
            return []
        out = Path(self.shared.get("train.output_dir")) / "bias"
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, result in self.results.items():
            frame, summary = items_and_summary(result)
            for kind, table in (("items", frame), ("summary", summary)):
                path = out / f"{name}_{kind}.csv"
                table.to_csv(path)
                written.append(path)
        self.saved.value = "saved: " + ", ".join(f"<code>{p}</code>" for p in written)
        return written


def items_and_summary(result) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A probe result's one row per item, and its summary, for the CSV files."""
    if isinstance(result, likelihood.PairResult):
        return result.scores, result.summary
    if isinstance(result, counterfactual.CounterfactualResult):
        return result.sentences, result.by_group
    return result.completions, result.by_group


def parity_cells(table: pd.DataFrame) -> pd.DataFrame:
    """`parity.parity_table` as "value [low, high]" cells."""
    return pd.DataFrame({"mean |gap|": [f"{r.mean_abs_gap:.3f} [{r.low:.3f}, {r.high:.3f}]" for r in table.itertuples()],
                         "share beyond": [f"{r.beyond_tolerance:.0%} [{r.beyond_low:.0%}, {r.beyond_high:.0%}]"
                                          for r in table.itertuples()]}, index=table.index)
