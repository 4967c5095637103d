"""The data stage in one call: load, normalise, check, clean, split and mitigate."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from ..config import DataConfig
from ..errors import UserError
from .bias_scan import scan
from .columns import key_text, normalize
from .loading import read_table, resolve_source
from .mitigation import mitigate
from .pairs import check_prompt_leakage
from .report import DataReport, add_bias_scan, build_report
from .split import clean, split


@dataclass
class PreparedData:
    splits: dict[str, pd.DataFrame]
    report: DataReport
    task: str
    labels: list[str]          # label words (classification), in a fixed order
    config: DataConfig


def prepare(cfg: DataConfig, source=None) -> PreparedData:
    """Load, normalise, check, clean and split. `source` overrides cfg.source (e.g. a DataFrame)."""
    if source is None:  # a built-in name's column defaults apply to that data set only
        cfg = resolve_source(cfg)
    raw = _load(cfg, source)
    frame = normalize(raw, cfg)
    report = build_report(raw, frame, cfg.task)
    cleaned = clean(frame, cfg)
    dropped = len(frame) - len(cleaned)
    report.add("rows dropped (empty or duplicate)", dropped, len(frame), "warning" if dropped else "ok", "")
    stratify = "label" if cfg.task == "classification" else None
    splits = _split(cleaned, cfg, stratify)
    groups = cfg.scan_groups or None  # None: the built-in term lists
    add_bias_scan(report, scan(splits["train"], groups))
    splits["train"] = mitigate(splits["train"], cfg, report)
    if cfg.counterfactual or cfg.reweight_groups:  # the scan again, on the rows that will be learned
        report.bias_scan_mitigated = scan(splits["train"], groups)
    _check_leakage(splits, report)
    if cfg.task == "preference":
        check_prompt_leakage(splits, report)
    report.split_sizes = {k: len(v) for k, v in splits.items()}
    labels = _label_order(cleaned, cfg) if stratify else []
    return PreparedData(splits, report, cfg.task, labels, cfg)


def _load(cfg: DataConfig, source) -> pd.DataFrame:
    """The raw table, sampled (seeded, in its order) down to data.max_rows."""
    raw = read_table(cfg.source if source is None else source, cfg)
    if cfg.max_rows and len(raw) > cfg.max_rows:
        raw = raw.sample(n=cfg.max_rows, random_state=cfg.seed).sort_index()
    return raw


def _split(cleaned: pd.DataFrame, cfg: DataConfig, stratify: str | None) -> dict[str, pd.DataFrame]:
    """The seeded split; the test split read from data.test_source where one is set."""
    splits = split(cleaned, cfg, stratify)
    if cfg.test_source:
        test_raw = read_table(cfg.test_source, cfg)
        splits["test"] = clean(normalize(test_raw, cfg), replace(cfg, drop_duplicates=False))
    if len(splits["train"]) == 0:
        raise UserError("no rows left for training after the split; add rows or lower the fractions")
    return splits


def _check_leakage(splits: dict[str, pd.DataFrame], report: DataReport) -> None:
    """How many validation and test texts are also training texts."""
    train_keys = set(key_text(splits["train"]))
    for name in ("validation", "test"):
        if len(splits[name]):
            shared = int(key_text(splits[name]).isin(train_keys).sum())
            report.add(f"leakage: {name} texts also in train", shared, len(splits[name]),
                       "warning" if shared else "ok", "")


def _label_order(cleaned: pd.DataFrame, cfg: DataConfig) -> list[str]:
    """The label words sorted, or in data.label_names' order where it names them (e.g.
    negative before positive)."""
    labels = sorted(cleaned["label"].unique())
    if labels and cfg.label_names:
        order = list(dict.fromkeys(cfg.label_names.values()))
        labels = [lab for lab in order if lab in labels] + [lab for lab in labels if lab not in order]
    return labels


def completion_sample(source: str, rows: int, seed: int = 0, field: str = "eval.general_source") -> pd.DataFrame:
    """A seeded sample of `rows` prompt/completion rows from a completion data set (a built-in
    name, a file or a Hub id); `field` names the setting in an error."""
    cfg = resolve_source(DataConfig(source=source, task="completion"))
    try:
        frame = clean(normalize(read_table(source, cfg), cfg), cfg)
    except UserError as err:
        raise UserError(f"{field}={source!r}: {err}") from None
    if frame.empty:
        raise UserError(f"{field}={source!r} has no prompt/completion rows left after cleaning")
    return frame.sample(n=min(rows, len(frame)), random_state=seed).reset_index(drop=True)
