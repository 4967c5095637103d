"""One runner for every front end (the panel, the magics, the command line): a probe on the
base model (adapter off) and on the tuned one, the base's result kept in the shared cache."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import assets
from ..data.columns import frame_digest
from ..evaluation.base_cache import BaseResults
from ..evaluation.scoring import label_probabilities
from . import pairs as pair_sets
from .completions import Draws, probe_completions
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


@dataclass
class ProbeTarget:
    """What the probes look at: the model (its base is the adapter switched off), how it reads
    text, and where the base's results are kept (`base_identity` names the base in their keys;
    None: the base's results are not kept)."""
    model: object
    tokenizer: object
    formatter: object = None
    labels: list = field(default_factory=list)
    objective: str = "completion"
    precision: str = "float32"
    base_results: BaseResults = field(default_factory=BaseResults)
    base_identity: object = None
    held_out: pair_sets.PairSet | None = None  # the test split's preference pairs ('held-out-pairs')


def before_after(run: Callable, target: ProbeTarget, key=None) -> dict:
    """`run(model)` on the base (adapter off) and on the tuned model. With a `key` naming the
    base model and the probe's inputs, the base's result is kept and reused. Dropout is off: a
    probe scores the model, not a draw of it."""
    target.model.eval()
    base = target.base_results.on_base(target.model, key, lambda: run(target.model))
    return {"base": base, "tuned": run(target.model)}


def pair_probe(target: ProbeTarget, pairs: pair_sets.PairSet, seed: int = 0, progress=print) -> dict:
    """Likelihood pairs on base and tuned: {"base": PairResult, "tuned": PairResult}."""
    key = None if target.base_identity is None else ("pairs", target.base_identity, pairs.name,
                                                     frame_digest(pairs.items), seed)
    return before_after(lambda m: probe_pairs(m, target.tokenizer, pairs, precision="float32", progress=progress,
                                              seed=seed), target, key)


def completion_probe(target: ProbeTarget, prompts, scorer, samples: int = 3, seed: int = 0, progress=print,
                     blocked: list[str] = ()) -> tuple[dict, dict]:
    """Completions on base and tuned, scored; with `blocked` words, the tuned model once more
    with them blocked while generating. Returns the results and what the filter blocked."""
    def probe(m, word_filter=None):
        return probe_completions(m, target.tokenizer, prompts, scorer, Draws(samples=samples, seed=seed), progress,
                                 word_filter)

    # Your own classifier may change between runs: its base result is never kept.
    kept = target.base_identity is not None and not isinstance(scorer, ClassifierScorer)
    key = ("completions", target.base_identity, frame_digest(prompts), scorer.name, tuple(getattr(scorer, "words", ())),
           samples, seed) if kept else None
    results = before_after(probe, target, key)
    if not blocked:
        return results, {}
    word_filter = WordFilter(target.tokenizer, list(blocked))
    results["tuned + word filter"] = probe(target.model, word_filter)
    return results, dict(word_filter.blocked)


def counterfactual_probe(target: ProbeTarget, label: str = "", templates: list[str] = TEMPLATES,
                         groups: list[str] = GROUPS, seed: int = 0) -> dict:
    """Counterfactual sentences scored by the classifier on base and tuned ({"tuned": ...}
    alone for a classification head, whose base head is untrained). `label` defaults to the
    last of the target's labels (e.g. positive after negative)."""
    t = target
    label = label or t.labels[-1]

    def run(m):
        return probe_counterfactual(lambda texts: label_probabilities(m, t.formatter, texts, t.labels, t.objective,
                                                                      precision=t.precision),
                                    t.labels, label, templates, groups, seed)

    if t.objective == "head":
        return {"tuned": run(t.model)}
    key = None if t.base_identity is None else ("counterfactual", t.base_identity, tuple(t.labels), label,
                                                tuple(templates), tuple(groups), seed)
    return before_after(run, t, key)
