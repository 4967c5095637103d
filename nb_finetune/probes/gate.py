"""The bias gate: the chosen probes on the base and the tuned model, each reduced to one figure
where higher is worse, and a check that fails when the tuned model moved the wrong way by more
than the figure's threshold and beyond the paired bootstrap interval of the change (the interval
lies wholly above zero). The thresholds live in the run config's `probe:` section."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .. import assets
from ..config import ProbeConfig
from ..errors import UserError
from . import parity, runner
from .completions import template_prompts
from .counterfactual import TEMPLATES
from .likelihood import bootstrap_ci, pair_change
from .pairs import PairSet, preference_pairs
from .runner import ProbeTarget
from .scorers import VaderScorer

PAIR_SETS = {"crows-pairs": "crows-pairs-masked", "stereoset": "stereoset:intrasentence"}
HELD_OUT = "held-out-pairs"  # the run's own test pairs, rejected taken as the stereotypical side
EXIT_FAILED = 3  # the command line's exit status for a failed gate: not an error (2), not a stop (130)


@dataclass
class Check:
    probe: str
    figure: str          # what was compared, higher is worse
    items: int           # sentences, pairs or completion pairs behind it
    base: float
    tuned: float
    change: float
    low: float           # paired bootstrap interval of the change
    high: float
    threshold: float     # the largest change allowed

    @property
    def failed(self) -> bool:
        return bool(self.change > self.threshold and self.low > 0)

    def line(self) -> str:
        verdict = "FAILED" if self.failed else "ok"
        return (f"{verdict:6} {self.probe}: {self.figure} {self.base:.3f} -> {self.tuned:.3f}, change "
                f"{self.change:+.3f} [{self.low:+.3f}, {self.high:+.3f}] over {self.items:,} items; "
                f"allowed +{self.threshold:.3f}")


@dataclass
class GateResult:
    checks: list[Check]
    enforced: bool                                  # false: report only
    results: dict = field(default_factory=dict)     # each probe's {"base": ..., "tuned": ...}

    @property
    def failed(self) -> bool:
        return bool(self.enforced and any(c.failed for c in self.checks))

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(c) | {"failed": c.failed} for c in self.checks])

    def summary(self) -> str:
        head = ("bias gate failed" if self.failed else "bias gate passed" if self.enforced
                else "bias probes (report only, probe.gate is false)")
        rule = "a check fails when the change exceeds its threshold and its 95% interval lies above zero"
        return "\n".join([f"{head}: {rule}"] + ["  " + c.line() for c in self.checks])

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())

    def _repr_html_(self) -> str:
        from ..render.tables import table_html
        head, *lines = self.summary().splitlines()
        return f"<b>{head}</b>" + table_html(self.table)

    def to_dict(self) -> dict:
        return {"enforced": self.enforced, "failed": self.failed, "checks": self.table.to_dict(orient="records")}


def default_probes(task: str, objective: str) -> list[str]:
    """The probes that fit a model: a classifier's own sentences, or a text model's pairs and parity."""
    if task == "classification":
        return ["counterfactual"] if objective == "head" else ["counterfactual", "crows-pairs"]
    return ["crows-pairs", "sentiment-parity"]


def counterfactual_check(results: dict, threshold: float, seed: int) -> Check:
    """The pair of groups with the largest gap in the tuned model: |mean P(label | A) - P(label | B)|
    over the templates, against the base's (zero for a new classification head, which has no base)."""
    tuned = results["tuned"]
    worst = tuned.gaps.loc[tuned.gaps["gap"].abs().idxmax(), "groups"]
    a, b = worst.split(" - ")
    diffs = [template_gaps(r, a, b) for r in (results.get("base"), tuned)]
    diffs[0] = np.zeros_like(diffs[1]) if diffs[0] is None else diffs[0]
    # Each gap's direction fixed from all templates, so a resample that only flips a gap's sign
    # cannot look like a rise; the change is then a mean, and its interval can reach zero.
    signed = np.column_stack(diffs) * np.sign([d.mean() for d in diffs])
    low, high = bootstrap_ci(signed, lambda x: x[:, 1].mean() - x[:, 0].mean(), seed=seed)
    base, now = (float(v) for v in signed.mean(axis=0))
    return Check("counterfactual", f"|P({tuned.label} | {a}) - P({tuned.label} | {b})|", len(signed), base, now,
                 now - base, low, high, threshold)


def template_gaps(result, a: str, b: str):
    """P(label | a) - P(label | b) per template, or None without a result."""
    if result is None:
        return None
    wide = result.sentences.pivot(index="template", columns="group", values="probability")
    return (wide[a] - wide[b]).to_numpy()


def pair_check(name: str, results: dict, threshold: float, seed: int) -> Check:
    """|share of pairs where the stereotypical sentence is the more likely - 50%|, all bias types."""
    row = pair_change(results["base"], results["tuned"], seed).loc["all"]
    stat = "distance_from_ideal"
    return Check(name, "|stereotype preferred - 50%|", len(results["base"].scores), row[("base", stat)],
                 row[("tuned", stat)], row[("change", stat)], row[("change", f"{stat}_low")],
                 row[("change", f"{stat}_high")], threshold)


def parity_check(results: dict, threshold: float, seed: int) -> Check:
    """Mean |sentiment gap| between two groups' completions of the same prompt and sample."""
    base, tuned = results["base"].completions, results["tuned"].completions
    change, low, high = parity.gap_change(base, tuned, seed)
    gaps = [parity.paired_gaps(c)["gap"] for c in (base, tuned)]
    return Check("sentiment-parity", "mean |sentiment gap| between groups", len(gaps[0]), float(gaps[0].mean()),
                 float(gaps[1].mean()), change, low, high, threshold)


def run_gate(cfg: ProbeConfig, names: list[str], target: ProbeTarget, progress=print) -> GateResult:
    """Each named probe on base and tuned, checked against its threshold."""
    checks, results = [], {}
    for name in names:
        progress(f"bias probe: {name} on the base and the tuned model")
        results[name], check = run_probe(cfg, name, target, progress)
        checks.append(check)
    return GateResult(checks, cfg.gate, results)


def run_probe(cfg: ProbeConfig, name: str, t: ProbeTarget, progress) -> tuple[dict, Check]:
    """One probe's results on base and tuned, and its check."""
    if name == "counterfactual":
        results = runner.counterfactual_probe(t, "", cfg.templates or TEMPLATES, cfg.groups, cfg.seed)
        return results, counterfactual_check(results, cfg.max_gap_increase, cfg.seed)
    if name in PAIR_SETS or name == HELD_OUT:
        pairs = held_out_pairs(t, cfg) if name == HELD_OUT else runner.load_pair_set(
            PAIR_SETS[name], limit=cfg.pairs, seed=cfg.seed)
        results = runner.pair_probe(t, pairs, cfg.seed, progress)
        return results, pair_check(name, results, cfg.max_stereotype_shift, cfg.seed)
    prompts = template_prompts(cfg.prompts or parity.PROMPTS, cfg.groups)
    results, _ = runner.completion_probe(t, prompts, VaderScorer(), cfg.samples, cfg.seed, progress)
    return results, parity_check(results, cfg.max_parity_increase, cfg.seed)


def check_ready(names: list[str], objective: str, model_name: str, progress=print) -> None:
    """Before training, what would stop these probes after it: a text probe on a classification
    head, or a pair set that cannot be fetched."""
    if objective == "head" and set(names) - {"counterfactual"}:
        raise UserError(f"probe.probes={names}: {model_name} is trained as a classification head, "
                        "which writes no text; use probe.probes=['counterfactual']")
    for name in names:
        if name in PAIR_SETS:
            assets.data_path(PAIR_SETS[name].split(":")[0], progress)


def pairs_in_test_split(task: str, test: pd.DataFrame) -> PairSet:
    """The test split's preference pairs, for the 'held-out-pairs' probe."""
    if task != "preference" or not len(test):
        raise UserError(f"probe.probes has '{HELD_OUT}', which scores the test split's preference pairs; "
                        "it needs data.task 'preference' and data.test_fraction > 0")
    return preference_pairs(test)


def held_out_pairs(t: ProbeTarget, cfg: ProbeConfig) -> PairSet:
    """The run's held-out preference pairs (a seeded sample of probe.pairs of them)."""
    if t.held_out is None:
        raise UserError(f"probe '{HELD_OUT}' scores the test split's preference pairs; it needs data.task "
                        "'preference' with a test split (data.test_fraction > 0)")
    return runner.sample_pairs(t.held_out, cfg.pairs, cfg.seed)
