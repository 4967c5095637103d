"""The data stage in one call: load, normalise, check, clean, split and mitigate."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from ..config import DataConfig
from ..errors import UserError
from .columns import key_text, normalize
from .loading import read_table, resolve_source
from .mitigation import mitigate
from .report import DataReport, build_report
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
    raw = read_table(cfg.source if source is None else source, cfg)
    if cfg.max_rows and len(raw) > cfg.max_rows:
        raw = raw.sample(n=cfg.max_rows, random_state=cfg.seed).sort_index()
    frame = normalize(raw, cfg)
    report = build_report(raw, frame, cfg.task)
    cleaned = clean(frame, cfg)
    dropped = len(frame) - len(cleaned)
    report.add("rows dropped (empty or duplicate)", dropped, len(frame), "warning" if dropped else "ok", "")
    stratify = "label" if cfg.task == "classification" else None
    splits = split(cleaned, cfg, stratify)
    if cfg.test_source:
        test_raw = read_table(cfg.test_source, cfg)
        splits["test"] = clean(normalize(test_raw, cfg), replace(cfg, drop_duplicates=False))
    if len(splits["train"]) == 0:
        raise UserError("no rows left for training after the split; add rows or lower the fractions")
    splits["train"] = mitigate(splits["train"], cfg, report)
    train_keys = set(key_text(splits["train"]))
    for name in ("validation", "test"):
        if len(splits[name]):
            shared = int(key_text(splits[name]).isin(train_keys).sum())
            report.add(f"leakage: {name} texts also in train", shared, len(splits[name]),
                       "warning" if shared else "ok", "")
    report.split_sizes = {k: len(v) for k, v in splits.items()}
    labels = sorted(cleaned["label"].unique()) if stratify else []
    if labels and cfg.label_names:  # keep the user's order (e.g. negative before positive)
        order = list(dict.fromkeys(cfg.label_names.values()))
        labels = [lab for lab in order if lab in labels] + [lab for lab in labels if lab not in order]
    return PreparedData(splits, report, cfg.task, labels, cfg)
