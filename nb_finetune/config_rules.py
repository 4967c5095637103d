"""Checks across a config's fields (a field's own type and range are checked in config.py).

Each function takes a RunConfig and returns every problem it finds, so the user sees them all
in one go."""
from __future__ import annotations

from pathlib import Path

from .errors import Problem

PREFERENCE_METHODS = ("dpo", "orpo")


def problems(cfg) -> list[Problem]:
    return data_problems(cfg) + run_problems(cfg) + preference_problems(cfg) + probe_problems(cfg)


def data_problems(cfg) -> list[Problem]:
    d, found = cfg.data, []
    if d.val_fraction + (0 if d.test_source else d.test_fraction) >= 0.9:
        found.append(Problem("data.val_fraction", d.val_fraction,
                             "val_fraction + test_fraction must leave at least 10% for training"))
    if d.text_template and "{" not in d.text_template:
        found.append(Problem("data.text_template", d.text_template,
                             "a template naming columns in braces, e.g. '{title}: {body}'"))
    if d.label_names and not all(isinstance(v, str) and v.strip() for v in d.label_names.values()):
        found.append(Problem("data.label_names", d.label_names, "every label needs a non-empty word"))
    for pair in d.counterfactual_terms:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t.strip()
                                                                          for t in pair)):
            found.append(Problem("data.counterfactual_terms", pair, "pairs of two words, e.g. [['he', 'she']]"))
            break
    if d.reweight_groups and (len(d.reweight_groups) < 2 or not all(
            isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v)
            for v in d.reweight_groups.values())):
        found.append(Problem("data.reweight_groups", d.reweight_groups,
                             "two or more groups, each with a list of words, e.g. {'female': ['she'], "
                             "'male': ['he']}"))
    return found


def run_problems(cfg) -> list[Problem]:
    t, found = cfg.train, []
    if cfg.model.objective == "head" and cfg.data.task != "classification":
        found.append(Problem("model.objective", "head", "a classification head needs data.task='classification'"))
    if t.resume_from and t.resume_from != "last" and not Path(t.resume_from).is_dir():
        found.append(Problem("train.resume_from", t.resume_from, "an existing checkpoint folder, or 'last'"))
    return found


def preference_problems(cfg) -> list[Problem]:
    t, pairs, pref = cfg.train, cfg.data.task == "preference", cfg.train.method in PREFERENCE_METHODS
    checks = [(not (isinstance(t.beta, (int, float)) and t.beta > 0), "train.beta", t.beta, "a number above 0"),
              (pref and not pairs, "train.method", t.method, "pairs: data.task='preference'; or train.method='sft'"),
              (pairs and not pref, "train.method", t.method, "'dpo' or 'orpo' for data.task='preference'"),
              (pref and t.packing, "train.packing", True, "false: a pair trains as its two answers")]
    return [Problem(field, value, accepted) for bad, field, value, accepted in checks if bad]


def probe_problems(cfg) -> list[Problem]:
    p, found = cfg.probe, []
    if "counterfactual" in p.probes and cfg.data.task != "classification":
        found.append(Problem("probe.probes", p.probes, "'counterfactual' scores a classifier: it needs "
                             "data.task='classification'"))
    if cfg.model.objective == "head" and set(p.probes) - {"counterfactual"}:
        found.append(Problem("probe.probes", p.probes, "a classification head writes no text: only "
                             "'counterfactual' applies"))
    if len(p.groups) < 2 or not all(isinstance(g, str) and g.strip() for g in p.groups):
        found.append(Problem("probe.groups", p.groups, "two or more group names, e.g. ['the woman', 'the man']"))
    for key in ("templates", "prompts"):
        if any(not isinstance(t, str) or "{group}" not in t for t in getattr(p, key)):
            found.append(Problem(f"probe.{key}", getattr(p, key), "text with a {group} slot, e.g. "
                                 "'I had lunch with {group} today.'"))
    return found
