"""The cost of tuning in general ability: the loss of the base and the tuned model on rows of a
general data set that training never saw (eval.general_source, e.g. Alpaca), per trained token,
with a bootstrap interval over rows."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import kernels
from ..data.collator import CompletionOnlyCollator
from ..data.columns import frame_digest
from ..data.formatter import IGNORE
from .evaluate import EvalTarget
from .scoring import bootstrap_ci, sequence_logprobs

COLUMNS = ["general_loss", "general_loss_low", "general_loss_high"]


def general_loss(target: EvalTarget, rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per model (tuned, base): mean loss per trained token on `rows` (prompt,
    completion), formatted as the training rows were, and its 95% interval."""
    t = target
    features = [f for f in t.fmt.encode_many(rows.to_dict("records")) if trained(f)]
    tokens = np.array([trained(f) for f in features], dtype=float)
    collator = CompletionOnlyCollator(t.fmt.tokenizer.pad_token_id)

    def losses(name: str):
        def compute():
            t.progress(f"general-set loss of the {name} model on {len(features)} rows")
            return -sequence_logprobs(t.model, features, collator, t.batch_size, t.precision)
        return compute

    t.model.eval()
    with kernels.for_inference(t.kernels_on):
        sums = {"tuned": losses("tuned")(),
                "base": t.base_results.on_base(t.model, t.base_key + ("general loss", frame_digest(rows)),
                                               losses("base"), t.progress, "general-set loss")}
    return pd.DataFrame.from_dict({name: per_token(s, tokens, seed) for name, s in sums.items()}, orient="index")


def trained(features: dict) -> int:
    return sum(label != IGNORE for label in features["labels"])


def per_token(sums: np.ndarray, tokens: np.ndarray, seed: int) -> dict:
    """Summed loss over summed tokens, with the interval from rows resampled together."""
    both = np.column_stack([sums, tokens])

    def ratio(a):
        return float(a[:, 0].sum() / a[:, 1].sum())

    low, high = bootstrap_ci(both, ratio, seed=seed)
    return dict(zip(COLUMNS, (ratio(both), low, high)))
