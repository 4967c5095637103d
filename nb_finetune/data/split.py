"""Cleaning (empty and duplicate rows) and the seeded, stratified train/validation/test split."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import UserError
from .columns import duplicated


def clean(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    for col in ("text", "prompt", "completion", "label"):
        if col in frame:
            keep &= frame[col].str.strip() != ""
    if "chosen" in frame:  # a pair with one answer twice teaches nothing (its loss has no gradient)
        keep &= frame["chosen"].str.strip() != frame["rejected"].str.strip()
    frame = frame[keep]
    if cfg.drop_duplicates:
        frame = frame[~duplicated(frame)]
    return frame.reset_index(drop=True)


def split(frame: pd.DataFrame, cfg: DataConfig, stratify: str | None) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split, stratified by `stratify` when given."""
    rng = np.random.default_rng(cfg.seed)
    fractions = {"validation": cfg.val_fraction, "test": 0.0 if cfg.test_source else cfg.test_fraction}
    groups = frame.groupby(stratify).indices.items() if stratify else [(None, np.arange(len(frame)))]
    parts = {"train": [], "validation": [], "test": []}
    for name, idx in groups:
        idx = rng.permutation(idx)
        need = 1 + sum(1 for f in fractions.values() if f > 0)
        if len(idx) < need:
            raise UserError(f"class {name!r} has only {len(idx)} row(s); a stratified split needs at least "
                            f"{need} (one per split): add rows, merge the class, or set the fractions to 0")
        start = 0
        for split_name, frac in fractions.items():
            k = max(1, round(len(idx) * frac)) if frac > 0 else 0
            parts[split_name].append(idx[start:start + k])
            start += k
        parts["train"].append(idx[start:])
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks)) if chunks else np.array([], dtype=int)
        out[name] = frame.iloc[idx].reset_index(drop=True)
    return out
