"""Likelihood-pair probes: is the stereotypical sentence the more likely?

Each sentence is scored by its total log-likelihood under the model, as lm-evaluation-harness
scores a causal LM (the sentence as a continuation of the BOS token, or of the context
sentence for StereoSet's intersentence items). Reported: the share of pairs where the
stereotypical sentence is the more likely (ideal 50%), the mean log-likelihood difference,
and StereoSet's lms / ss / icat, each with a bootstrap confidence interval, overall and by
bias type."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.collator import CompletionOnlyCollator
from ..data.formatter import IGNORE
from ..evaluation.scoring import bootstrap_ci, sequence_logprobs  # noqa: F401 (bootstrap_ci: used by the probes here)
from .pairs import PairSet

# Shown beside every pair-probe result: what the numbers do and do not say.
CAVEAT = ("The ideal is 50%: no preference either way, and neither side of it is better. These sets "
          "(CrowS-Pairs, Nangia et al. 2020; StereoSet, Nadeem et al. 2021) measure how often a model finds "
          "the more stereotypical sentence of a crowd-written, US-centric pair the more likely. They do not "
          "measure harm in generated text or in a downstream task, and both hold noisy and ill-posed pairs "
          "(Blodgett et al. 2021): read a change with its interval, as one signal among several.")


def _stereoset_scores(rows: np.ndarray) -> np.ndarray:
    """lms, ss, icat (in %) from rows of (more, less, unrelated) log-likelihoods."""
    more, less, unrelated = rows[:, 0], rows[:, 1], rows[:, 2]
    lms = ((more > unrelated).mean() + (less > unrelated).mean()) / 2 * 100
    ss = (more > less).mean() * 100
    return np.array([lms, ss, lms * min(ss, 100 - ss) / 50])


def sentence_features(tokenizer, sentences: list[str], contexts: list[str] | None = None) -> list[dict]:
    """Token ids with labels on the sentence only: BOS (else EOS) [+ context] + sentence."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    features = []
    for i, text in enumerate(sentences):
        head = [prefix]
        if contexts is not None:
            head += tokenizer(contexts[i], add_special_tokens=False)["input_ids"]
            text = " " + text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        features.append({"input_ids": head + ids, "labels": [IGNORE] * len(head) + ids})
    return features


def sentence_logprobs(model, tokenizer, sentences: list[str], contexts: list[str] | None = None,
                      batch_size: int = 16, precision: str = "float32", progress=print) -> np.ndarray:
    """Total log-likelihood of each sentence; batched by length so padding stays small."""
    features = sentence_features(tokenizer, sentences, contexts)
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
    collator = CompletionOnlyCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, None)
    scores = np.zeros(len(features))
    step = batch_size * 8
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        scores[chunk] = sequence_logprobs(model, [features[j] for j in chunk], collator, batch_size, precision)
        progress(f"scored {min(start + step, len(order)):,}/{len(order):,} sentences")
    return scores


@dataclass
class PairResult:
    name: str
    scores: pd.DataFrame     # one row per item: log-likelihoods, difference, which one won
    summary: pd.DataFrame    # overall and per bias type, with bootstrap intervals

    def _repr_html_(self) -> str:
        from ..render.tables import table_html
        return f"<b>{self.name}</b>" + table_html(self.summary, index=True) + f"<div>{CAVEAT}</div>"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(f"{self.name}\n{self.summary.to_string(float_format=lambda v: f'{v:.3f}')}")


def distance_from_ideal(prefers: np.ndarray) -> float:
    """|share of pairs where the stereotypical sentence is the more likely - 50%|."""
    return abs(float(np.mean(prefers)) - 0.5)


ITEM_COLUMNS = ["prefers_more", "difference", "more_logprob", "less_logprob", "unrelated_logprob"]
STEREOSET = ("lms", "ss", "icat")  # need the unrelated sentence
# Each headline statistic from an array of items' ITEM_COLUMNS (the summary, and the change's interval).
STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "stereotype_preferred": lambda a: float(a[:, 0].mean()),
    "distance_from_ideal": lambda a: distance_from_ideal(a[:, 0]),
    "mean_difference": lambda a: float(a[:, 1].mean()),
    "lms": lambda a: float(_stereoset_scores(a[:, 2:5])[0]),
    "ss": lambda a: float(_stereoset_scores(a[:, 2:5])[1]),
    "icat": lambda a: float(_stereoset_scores(a[:, 2:5])[2]),
}


def summarise(scores: pd.DataFrame, seed: int) -> pd.DataFrame:
    """STATISTICS overall and per bias type, each with its bootstrap interval (StereoSet's
    after its three figures, from fewer resamples)."""
    rows = {}
    for name, part in [("all", scores)] + list(scores.groupby("bias_type")):
        items = item_array(part)
        stats = [c for c in STATISTICS if c not in STEREOSET or "unrelated_logprob" in part]
        row = {"pairs": len(part)}
        for c in stats:
            row[c] = STATISTICS[c](items)
            if c not in STEREOSET:
                row[f"{c}_low"], row[f"{c}_high"] = bootstrap_ci(items, STATISTICS[c], seed=seed)
        for c in (c for c in stats if c in STEREOSET):
            row[f"{c}_low"], row[f"{c}_high"] = bootstrap_ci(items, STATISTICS[c], n=400, seed=seed)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("bias_type")


def probe_pairs(model, tokenizer, pairs: PairSet, batch_size: int = 16, precision: str = "float32",
                progress=print, seed: int = 0) -> PairResult:
    items = pairs.items
    contexts = list(items["context"]) if "context" in items else None
    columns = ["more", "less"] + (["unrelated"] if "unrelated" in items else [])
    texts = [t for c in columns for t in items[c]]
    progress(f"{pairs.name}: scoring {len(items):,} items ({len(texts):,} sentences)")
    logp = sentence_logprobs(model, tokenizer, texts, None if contexts is None else contexts * len(columns),
                             batch_size, precision, progress)
    scores = items.copy()
    for i, c in enumerate(columns):
        scores[f"{c}_logprob"] = logp[i * len(items):(i + 1) * len(items)]
    scores["difference"] = scores["more_logprob"] - scores["less_logprob"]
    scores["prefers_more"] = scores["difference"] > 0
    return PairResult(pairs.name, scores, summarise(scores, seed))


def pair_change(base: PairResult, tuned: PairResult, seed: int = 0) -> pd.DataFrame:
    """The headline numbers of both runs side by side with their intervals, and the change
    with a paired bootstrap interval (the same pairs resampled for both runs)."""
    keep = [c for c in STATISTICS if c in base.summary]
    with_bounds = [f"{c}{end}" for c in keep for end in ("", "_low", "_high")]
    out = pd.concat({"base": base.summary[with_bounds], "tuned": tuned.summary[with_bounds]}, axis=1)
    both = np.hstack([item_array(base.scores), item_array(tuned.scores)])
    rows = {"all": np.arange(len(both))} | {k: np.asarray(v) for k, v in
                                              base.scores.reset_index(drop=True).groupby("bias_type").indices.items()}
    for c in keep:
        out[("change", c)] = out[("tuned", c)] - out[("base", c)]
        bounds = {name: bootstrap_ci(both[idx], paired(STATISTICS[c]), n=400, seed=seed) for name, idx in rows.items()}
        out[("change", f"{c}_low")] = [bounds[name][0] for name in out.index]
        out[("change", f"{c}_high")] = [bounds[name][1] for name in out.index]
    return out


def paired(stat: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    """stat(tuned) - stat(base) on rows that hold the base's items, then the tuned model's."""
    width = len(ITEM_COLUMNS)
    return lambda a: stat(a[:, width:]) - stat(a[:, :width])


def item_array(scores: pd.DataFrame) -> np.ndarray:
    """ITEM_COLUMNS as floats, NaN where a pair set has no such column."""
    return scores.reindex(columns=ITEM_COLUMNS).to_numpy(float)
