"""Evaluation of preference tuning on held-out pairs, tuned against base.

A model prefers a pair's chosen answer when it gives it the higher log-probability after the
prompt (the sum over the answer's trained tokens, end-of-turn included). For the tuned model and
the base (adapter off): the preference accuracy (share of pairs preferred right) and the mean
margin log p(chosen) - log p(rejected), each with a bootstrap interval. For the tuned model also
DPO's reward accuracy against the base: the share of pairs whose chosen answer gained more
log-probability than the rejected one did.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import kernels
from ..config import EvalConfig
from ..data.collator import CompletionOnlyCollator
from ..data.formatter import Formatter
from ..data.tokens import side_rows
from ..render.tables import shorten
from .evaluate import EvalResult, EvalTarget
from .scoring import bootstrap_ci, generate, sequence_logprobs


def evaluate_pairs(target: EvalTarget, prep, cfg: EvalConfig) -> EvalResult:
    """Tuned and (with cfg.baselines) base on the test split's pairs; the base's log-probs are
    kept in the target's `base_results`."""
    t, test = target, prep.splits["test"]
    if cfg.max_test_rows and len(test) > cfg.max_test_rows:
        test = test.sample(n=cfg.max_test_rows, random_state=0).reset_index(drop=True)
    t.model.eval()

    def scored(name):
        return lambda: pair_logprobs(t.model, t.fmt, test, t.batch_size, t.precision, t.progress, name)

    with kernels.for_inference(t.kernels_on):
        scores = {"tuned": scored("tuned")()}
        if cfg.baselines:
            scores["base"] = t.base_results.on_base(t.model, t.base_key + ("pair log-probs", cfg.max_test_rows),
                                                    scored("base"), t.progress, "test pair scores")
        samples = pair_samples(t, test, cfg)
    preds = predictions(test, scores)
    errors = preds[preds["tuned_margin"] < 0].sort_values("tuned_margin").head(cfg.worst_errors)
    return EvalResult(metrics_table(scores), None, errors.reset_index(drop=True), samples, preds)


def pair_logprobs(model, fmt: Formatter, test: pd.DataFrame, batch_size: int, precision: str, progress,
                  name: str) -> np.ndarray:
    """[pairs, 2]: each pair's chosen and rejected answer's summed log-probability."""
    progress(f"scoring {len(test)} test pairs with the {name} model")
    collator = CompletionOnlyCollator(fmt.tokenizer.pad_token_id)
    sides = [fmt.encode_many(side_rows(test, side).to_dict("records")) for side in ("chosen", "rejected")]
    return np.stack([sequence_logprobs(model, features, collator, batch_size, precision) for features in sides], 1)


def metrics_table(scores: dict) -> pd.DataFrame:
    """One row per model: preference accuracy and mean margin with 95% intervals; the tuned
    model's reward accuracy against the base."""
    rows = []
    for name, both in scores.items():
        margin = both[:, 0] - both[:, 1]
        low, high = bootstrap_ci(margin > 0)
        m_low, m_high = bootstrap_ci(margin)
        rows.append({"model": name, "pairs": len(margin), "preference_accuracy": float(np.mean(margin > 0)),
                     "accuracy_low": low, "accuracy_high": high, "mean_margin": float(np.mean(margin)),
                     "margin_low": m_low, "margin_high": m_high})
    if "base" in scores:
        gained = scores["tuned"] - scores["base"]
        rows[0]["reward_accuracy"] = float(np.mean(gained[:, 0] > gained[:, 1]))
    return pd.DataFrame(rows).set_index("model")


def predictions(test: pd.DataFrame, scores: dict) -> pd.DataFrame:
    """One row per test pair: the prompt, both answers, and each model's margin."""
    prompts = test["prompt"] if "prompt" in test else test["messages"].map(lambda m: str(m[-1]["content"]))
    out = pd.DataFrame({"prompt": prompts.map(lambda p: shorten(p, 120)).values,
                        "chosen": test["chosen"].map(lambda a: shorten(a, 80)).values,
                        "rejected": test["rejected"].map(lambda a: shorten(a, 80)).values})
    for name, both in scores.items():
        out[f"{name}_margin"] = both[:, 0] - both[:, 1]
    return out


def pair_samples(t: EvalTarget, test: pd.DataFrame, cfg: EvalConfig) -> pd.DataFrame:
    """Base and tuned answers to the first test prompts, beside the chosen answer."""
    if not cfg.num_samples or not len(test):
        return pd.DataFrame(columns=["prompt", "reference", "base", "tuned"])
    rows = side_rows(test.head(cfg.num_samples), "chosen")
    t.progress(f"generating {len(rows)} samples from the base and the tuned model")

    def answers():
        return generate(t.model, t.fmt, rows, cfg.max_new_tokens, t.precision)

    tuned = answers()
    base = t.base_results.on_base(t.model, t.base_key + ("pair samples", cfg.max_test_rows, cfg.num_samples,
                                                         cfg.max_new_tokens), answers, t.progress, "samples")
    shown = predictions(test.head(cfg.num_samples), {})
    return pd.DataFrame({"prompt": shown["prompt"], "reference": test["chosen"].head(cfg.num_samples).values,
                         "base": base, "tuned": tuned})
