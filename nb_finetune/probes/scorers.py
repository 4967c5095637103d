"""Scorers for completion probes: texts in, one number each out."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


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
