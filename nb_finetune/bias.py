"""Bias probes: does the model prefer stereotypes, and do its completions treat groups differently?

Two kinds, each run on the base model (adapter off) and the tuned model:

- Likelihood pairs (CrowS-Pairs, StereoSet, WinoBias): each sentence is scored by its total
  log-likelihood under the model, as lm-evaluation-harness scores a causal LM (the sentence as
  a continuation of the BOS token, or of the context sentence for StereoSet's intersentence
  items). Reported: the share of pairs where the stereotypical sentence is the more likely
  (ideal 50%), the mean log-likelihood difference, and StereoSet's lms / ss / icat, each with
  a bootstrap confidence interval, overall and by bias type.
- Completion probes: prompts with a group slot ("The {group} worked as a") or BOLD prompts;
  several seeded samples per prompt, each scored by a pluggable scorer (VADER sentiment,
  a classifier you pass, a word list). Reported per group with confidence intervals, the gap
  between groups, and the completion pairs that differ most.

No widgets here; the panel and the notebooks call these functions.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import UserError
from .evaluation import _base, sequence_logprobs
from .tokenization import IGNORE, CompletionOnlyCollator

PAIR_COLUMNS = ["more", "less", "bias_type"]  # optional: "unrelated", "context"


# -- pair sets ---------------------------------------------------------------------------

@dataclass
class PairSet:
    """One row per item: `more` (the stereotypical sentence), `less` (the anti-stereotypical
    one), `bias_type`, and where the set has them `unrelated` and `context`."""
    name: str
    items: pd.DataFrame
    dropped: int = 0  # items left out (identical sentences), reported

    def __post_init__(self):
        missing = [c for c in PAIR_COLUMNS if c not in self.items]
        if missing:
            raise UserError(f"pair set {self.name!r} lacks the column(s) {', '.join(missing)}; it needs "
                            f"{', '.join(PAIR_COLUMNS)} (and may have unrelated, context)")
        if self.items.empty:
            raise UserError(f"pair set {self.name!r} has no pairs")


def _need(frame: pd.DataFrame, columns: list[str], path) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")


def crows_pairs(path: str | Path) -> PairSet:
    """CrowS-Pairs: the original CSV (sent_more, sent_less, bias_type) or the masked form
    (sentence with [MASK], mask1 = the stereotyped group's word, mask2, bias_type)."""
    frame = pd.read_csv(path)
    if "sentence" in frame and "mask1" in frame:
        _need(frame, ["sentence", "mask1", "mask2", "bias_type"], path)
        items = pd.DataFrame({"more": [s.replace("[MASK]", str(m)) for s, m in zip(frame["sentence"], frame["mask1"])],
                              "less": [s.replace("[MASK]", str(m)) for s, m in zip(frame["sentence"], frame["mask2"])],
                              "bias_type": frame["bias_type"]})
    else:
        _need(frame, ["sent_more", "sent_less", "bias_type"], path)
        items = frame.rename(columns={"sent_more": "more", "sent_less": "less"})[PAIR_COLUMNS]
    return _pairs("crows-pairs", items)


def stereoset(path: str | Path, kind: str = "intrasentence") -> PairSet:
    """StereoSet items of one kind; intersentence sentences are scored after their context."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("type") == kind]
    if not rows:
        raise UserError(f"{path}: no StereoSet items of type {kind!r} (intrasentence or intersentence)")
    frame = pd.DataFrame(rows)
    _need(frame, ["stereotype", "anti-stereotype", "unrelated", "bias_type", "context"], path)
    items = pd.DataFrame({"more": frame["stereotype"], "less": frame["anti-stereotype"],
                          "unrelated": frame["unrelated"], "bias_type": frame["bias_type"]})
    if kind == "intersentence":
        items["context"] = frame["context"]
    return _pairs(f"stereoset-{kind}", items)


def winobias(folder: str | Path, split: str = "dev") -> PairSet:
    """WinoBias: line i of pro_stereotyped_typeN.txt.SPLIT against line i of anti_stereotyped_typeN."""
    folder = Path(folder)
    frames = []
    for kind in ("type1", "type2"):
        pro = folder / f"pro_stereotyped_{kind}.txt.{split}"
        anti = folder / f"anti_stereotyped_{kind}.txt.{split}"
        if not pro.is_file() or not anti.is_file():
            raise UserError(f"{folder}: expected {pro.name} and {anti.name} (WinoBias files)")
        more = [_plain(t) for t in pro.read_text(encoding="utf-8").splitlines() if t.strip()]
        less = [_plain(t) for t in anti.read_text(encoding="utf-8").splitlines() if t.strip()]
        if len(more) != len(less):
            raise UserError(f"{pro.name} and {anti.name} differ in length ({len(more)} vs {len(less)} lines)")
        frames.append(pd.DataFrame({"more": more, "less": less, "bias_type": f"gender ({kind})"}))
    return _pairs(f"winobias-{split}", pd.concat(frames, ignore_index=True))


def _plain(line: str) -> str:
    """A WinoBias line without its optional leading number and the [brackets] marking the mentions."""
    return re.sub(r"^\d+\s+", "", line).replace("[", "").replace("]", "").strip()


def _pairs(name: str, items: pd.DataFrame) -> PairSet:
    same = items["more"] == items["less"]  # e.g. WinoBias lines that do not differ: no signal
    return PairSet(name, items[~same].reset_index(drop=True), int(same.sum()))


# -- statistics --------------------------------------------------------------------------

def bootstrap_ci(values, stat: Callable = np.mean, n: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over resampled rows (rows resampled together
    when `values` is 2-D)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def _stereoset_scores(rows: np.ndarray) -> np.ndarray:
    """lms, ss, icat (in %) from rows of (more, less, unrelated) log-likelihoods."""
    more, less, unrelated = rows[:, 0], rows[:, 1], rows[:, 2]
    lms = ((more > unrelated).mean() + (less > unrelated).mean()) / 2 * 100
    ss = (more > less).mean() * 100
    return np.array([lms, ss, lms * min(ss, 100 - ss) / 50])


# -- likelihood pairs --------------------------------------------------------------------

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
        from .plots import table_html
        return f"<b>{self.name}</b>" + table_html(self.summary, index=True)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(f"{self.name}\n{self.summary.to_string(float_format=lambda v: f'{v:.3f}')}")


def _summarise(scores: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = {}
    groups = [("all", scores)] + list(scores.groupby("bias_type"))
    for name, part in groups:
        prefers = part["prefers_more"].to_numpy(float)
        diff = part["difference"].to_numpy()
        row = {"pairs": len(part), "stereotype_preferred": prefers.mean()}
        row["stereotype_preferred_low"], row["stereotype_preferred_high"] = bootstrap_ci(prefers, seed=seed)
        row["mean_difference"] = diff.mean()
        row["mean_difference_low"], row["mean_difference_high"] = bootstrap_ci(diff, seed=seed)
        if "unrelated_logprob" in part:
            trio = part[["more_logprob", "less_logprob", "unrelated_logprob"]].to_numpy()
            row["lms"], row["ss"], row["icat"] = _stereoset_scores(trio)
            boot = [bootstrap_ci(trio, lambda r, k=k: _stereoset_scores(r)[k], n=400, seed=seed) for k in range(3)]
            (row["lms_low"], row["lms_high"]), (row["ss_low"], row["ss_high"]), (row["icat_low"], row["icat_high"]) = boot
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
    return PairResult(pairs.name, scores, _summarise(scores, seed))


# -- completion probes -------------------------------------------------------------------

class VaderScorer:
    """Sentiment from the VADER lexicon: compound score in [-1, 1]; runs offline."""
    name = "sentiment (VADER compound)"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.array([self.analyzer.polarity_scores(t)["compound"] for t in texts])


@dataclass
class WordListScorer:
    """1.0 where a completion contains any of the words (whole words, any case), else 0.0."""
    words: list[str]
    name: str = "flagged words"

    def __post_init__(self):
        if not self.words:
            raise UserError("the word list is empty; give at least one word to flag")
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.array([1.0 if self.pattern.search(t) else 0.0 for t in texts])


@dataclass
class ClassifierScorer:
    """Any function texts -> scores, e.g. the probability of 'positive' from a model you tuned."""
    predict: Callable[[list[str]], np.ndarray]
    name: str = "classifier"

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.predict(texts), dtype=float)


def template_prompts(templates: list[str], groups: list[str]) -> pd.DataFrame:
    """Every template filled with every group: columns group, template, prompt."""
    if not groups:
        raise UserError("the group list is empty; give two or more groups to compare, e.g. ['women', 'men']")
    bad = [t for t in templates if "{group}" not in t]
    if not templates or bad:
        raise UserError(f"template {bad[0]!r} has no {{group}} slot; write it like 'The {{group}} worked as a'"
                        if bad else "no templates given")
    return pd.DataFrame([{"group": g, "template": t, "prompt": t.replace("{group}", g)}
                         for t in templates for g in groups])


def bold_prompts(path: str | Path, groups: list[str] | None = None, per_group: int = 10, seed: int = 0
                 ) -> pd.DataFrame:
    """BOLD prompts ({group: {name: [prompts]}}), `per_group` sampled per group with the seed."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    groups = groups or list(data)
    unknown = [g for g in groups if g not in data]
    if unknown:
        raise UserError(f"{path}: no group(s) {', '.join(unknown)}; it has {', '.join(data)}")
    rows = [{"group": g, "template": name, "prompt": p} for g in groups for name, ps in data[g].items() for p in ps]
    shuffled = pd.DataFrame(rows).sample(frac=1.0, random_state=seed)
    return shuffled.groupby("group", sort=False).head(per_group).reset_index(drop=True)


@torch.inference_mode()
def sample_completions(model, tokenizer, prompts: list[str], samples: int = 3, max_new_tokens: int = 20,
                       temperature: float = 0.8, seed: int = 0, batch_size: int = 8, progress=print,
                       word_filter=None) -> list[list[str]]:
    """`samples` completions per prompt, reproducible for a seed (left-padded batches);
    `word_filter` (a `mitigation.WordFilter`) blocks words as they are generated."""
    from transformers import LogitsProcessorList
    processors = LogitsProcessorList([word_filter] if word_filter is not None else [])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            torch.manual_seed(seed + start)
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples, pad_token_id=pad,
                                 logits_processor=processors)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i * samples:(i + 1) * samples] for i in range(len(chunk))]
            progress(f"generated for {min(start + batch_size, len(prompts)):,}/{len(prompts):,} prompts")
    finally:
        tokenizer.padding_side = side
    return out


@dataclass
class CompletionResult:
    scorer: str
    completions: pd.DataFrame   # group, template, prompt, sample, completion, score
    by_group: pd.DataFrame      # mean score with bootstrap interval per group
    gap: dict                   # largest difference between group means, with interval
    divergent: pd.DataFrame = field(default_factory=pd.DataFrame)  # same template, groups far apart

    def _repr_html_(self) -> str:
        from .plots import table_html
        return (f"<b>completion probe: {self.scorer}</b>" + table_html(self.by_group, index=True)
                + f"<div>gap {self.gap['gap']:.3f} [{self.gap['low']:.3f}, {self.gap['high']:.3f}] "
                  f"between {self.gap['high_group']} and {self.gap['low_group']}</div>"
                + table_html(self.divergent.head(5)))

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(f"completion probe: {self.scorer}\n{self.by_group.to_string(float_format=lambda v: f'{v:.3f}')}\n"
               f"gap {self.gap['gap']:.3f} [{self.gap['low']:.3f}, {self.gap['high']:.3f}] between "
               f"{self.gap['high_group']} and {self.gap['low_group']}")


def probe_completions(model, tokenizer, prompts: pd.DataFrame, scorer, samples: int = 3,
                      max_new_tokens: int = 20, seed: int = 0, progress=print, word_filter=None) -> CompletionResult:
    texts = sample_completions(model, tokenizer, list(prompts["prompt"]), samples, max_new_tokens, seed=seed,
                               progress=progress, word_filter=word_filter)
    rows = [{**r, "sample": k, "completion": c} for r, cs in zip(prompts.to_dict("records"), texts)
            for k, c in enumerate(cs)]
    frame = pd.DataFrame(rows)
    frame["score"] = scorer(list(frame["completion"]))
    by_group = {}
    for g, part in frame.groupby("group", sort=False):
        low, high = bootstrap_ci(part["score"], seed=seed)
        by_group[g] = {"completions": len(part), "mean": part["score"].mean(), "low": low, "high": high}
    by_group = pd.DataFrame.from_dict(by_group, orient="index").rename_axis("group")
    top, bottom = by_group["mean"].idxmax(), by_group["mean"].idxmin()
    a, b = frame.loc[frame["group"] == top, "score"].to_numpy(), frame.loc[frame["group"] == bottom, "score"].to_numpy()
    rng = np.random.default_rng(seed)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(1000)]
    gap = {"gap": float(a.mean() - b.mean()), "low": float(np.percentile(boots, 2.5)),
           "high": float(np.percentile(boots, 97.5)), "high_group": top, "low_group": bottom}
    return CompletionResult(getattr(scorer, "name", "score"), frame, by_group, gap, _divergent(frame))


def _divergent(frame: pd.DataFrame) -> pd.DataFrame:
    """For each template, the two groups whose mean scores differ most, with one completion each."""
    rows = []
    for template, part in frame.groupby("template"):
        means = part.groupby("group")["score"].mean()
        if len(means) < 2:
            continue
        hi, lo = means.idxmax(), means.idxmin()
        pick = lambda g: part[part["group"] == g].sort_values("score").iloc[-1 if g == hi else 0]  # noqa: E731
        rows.append({"template": template, "difference": means[hi] - means[lo], "group_a": hi,
                     "completion_a": pick(hi)["completion"], "group_b": lo, "completion_b": pick(lo)["completion"]})
    return pd.DataFrame(rows).sort_values("difference", ascending=False).reset_index(drop=True) if rows \
        else pd.DataFrame(rows)


# -- before and after --------------------------------------------------------------------

def before_after(run: Callable, model, memo: dict | None = None, key=None) -> dict:
    """`run(model)` on the base (adapter off) and on the tuned model.

    With `memo` and a `key` naming the base model and the probe's inputs, the base's result is
    kept in memo[key] and reused: training the adapter again does not change the base, so a
    probe after each training (before and after a mitigation, say) runs the base once."""
    if memo is not None and key is not None and key in memo:
        base = memo[key]
    else:
        with _base(model):
            base = run(model)
        if memo is not None and key is not None:
            memo[key] = base
    return {"base": base, "tuned": run(model)}


def pair_change(base: PairResult, tuned: PairResult) -> pd.DataFrame:
    """The headline numbers of both runs side by side, and the change."""
    keep = [c for c in ("stereotype_preferred", "mean_difference", "lms", "ss", "icat") if c in base.summary]
    out = pd.concat({"base": base.summary[keep], "tuned": tuned.summary[keep]}, axis=1)
    for c in keep:
        out[("change", c)] = out[("tuned", c)] - out[("base", c)]
    return out
