"""One runner for every front end (the panel, the magics, the command line): a probe on the
base model (adapter off) and on the tuned one, the base's result kept in the shared cache."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import assets
from ..data.columns import frame_digest
from ..evaluation.base_cache import BaseResults
from ..evaluation.scoring import label_probabilities
from . import pairs as pair_sets
from .completions import probe_completions
from .counterfactual import GROUPS, TEMPLATES, probe_counterfactual
from .filter import WordFilter
from .likelihood import probe_pairs
from .scorers import ClassifierScorer, VaderScorer, WordListScorer

# Pair sets by name: built-in ones, or files named by a path.
PAIR_SET_NAMES = ("crows-pairs-masked", "stereoset:intrasentence", "stereoset:intersentence", "crows-file",
                  "winobias-folder")


def load_pair_set(choice: str, path: str = "", limit: int = 0, seed: int = 0) -> pair_sets.PairSet:
    """A pair set by name (PAIR_SET_NAMES); with `limit`, a seeded sample that keeps every
    bias type in proportion."""
    if choice == "crows-pairs-masked":
        pairs = pair_sets.crows_pairs(assets.data_path("crows-pairs-masked"))
    elif choice.startswith("stereoset:"):
        pairs = pair_sets.stereoset(assets.data_path("stereoset"), choice.split(":")[1])
    elif choice == "crows-file":
        pairs = pair_sets.crows_pairs(Path(path).expanduser())
    else:
        pairs = pair_sets.winobias(Path(path).expanduser())
    return sample_pairs(pairs, limit, seed)


def sample_pairs(pairs: pair_sets.PairSet, limit: int, seed: int = 0) -> pair_sets.PairSet:
    """A seeded sample of `limit` pairs (all of them when there are no more)."""
    if limit and len(pairs.items) > limit:
        return pair_sets.PairSet(pairs.name, pairs.items.sample(n=limit, random_state=seed).reset_index(drop=True))
    return pairs


def scorer_for(name: str, words: list[str], classifier=None):
    """'sentiment (VADER)', 'word list' (flags `words`) or 'your classifier' (texts -> numbers)."""
    if name == "your classifier":
        return ClassifierScorer(classifier, "your classifier")
    if name.startswith("sentiment"):
        return VaderScorer()
    return WordListScorer(words)


def before_after(run: Callable, model, base_results: BaseResults | None = None, key=None) -> dict:
    """`run(model)` on the base (adapter off) and on the tuned model. With a `key` naming the
    base model and the probe's inputs, the base's result is kept and reused."""
    base = (base_results or BaseResults()).on_base(model, key, lambda: run(model))
    return {"base": base, "tuned": run(model)}


def pair_probe(model, tokenizer, pairs: pair_sets.PairSet, seed: int = 0, progress=print,
               base_results: BaseResults | None = None, base_identity=None) -> dict:
    """Likelihood pairs on base and tuned: {"base": PairResult, "tuned": PairResult}."""
    key = None if base_identity is None else ("pairs", base_identity, pairs.name, frame_digest(pairs.items), seed)
    return before_after(lambda m: probe_pairs(m, tokenizer, pairs, precision="float32", progress=progress,
                                              seed=seed), model, base_results, key)


def completion_probe(model, tokenizer, prompts, scorer, samples: int = 3, seed: int = 0, progress=print,
                     base_results: BaseResults | None = None, base_identity=None, blocked: list[str] = ()
                     ) -> tuple[dict, dict]:
    """Completions on base and tuned, scored; with `blocked` words, the tuned model once more
    with them blocked while generating. Returns the results and what the filter blocked."""
    def probe(m, word_filter=None):
        return probe_completions(m, tokenizer, prompts, scorer, samples, seed=seed, progress=progress,
                                 word_filter=word_filter)

    # Your own classifier may change between runs: its base result is never kept.
    kept = base_identity is not None and not isinstance(scorer, ClassifierScorer)
    key = ("completions", base_identity, frame_digest(prompts), scorer.name, tuple(getattr(scorer, "words", ())),
           samples, seed) if kept else None
    results = before_after(probe, model, base_results, key)
    if not blocked:
        return results, {}
    word_filter = WordFilter(tokenizer, list(blocked))
    results["tuned + word filter"] = probe(model, word_filter)
    return results, dict(word_filter.blocked)


def counterfactual_probe(model, formatter, labels: list[str], objective: str, label: str = "",
                         templates: list[str] = TEMPLATES, groups: list[str] = GROUPS, seed: int = 0,
                         precision: str = "float32", base_results: BaseResults | None = None, base_identity=None
                         ) -> dict:
    """Counterfactual sentences scored by the classifier on base and tuned ({"tuned": ...}
    alone for a classification head, whose base head is untrained). `label` defaults to the
    last of `labels` (e.g. positive after negative)."""
    label = label or labels[-1]

    def run(m):
        return probe_counterfactual(lambda texts: label_probabilities(m, formatter, texts, labels, objective,
                                                                      precision=precision),
                                    labels, label, templates, groups, seed)

    if objective == "head":
        return {"tuned": run(model)}
    key = None if base_identity is None else ("counterfactual", base_identity, tuple(labels), label,
                                              tuple(templates), tuple(groups), seed)
    return before_after(run, model, base_results, key)
