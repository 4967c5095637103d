"""The output-side mitigation: a logits processor that stops generation from writing blocked
words or phrases, and counts what it blocked."""
from __future__ import annotations

from collections import Counter

import torch
from transformers import LogitsProcessor

from ..errors import UserError


class WordFilter(LogitsProcessor):
    """Blocks words and phrases at generation time (any case, with or without a leading space)
    and counts, per word, the steps where the model's first choice was blocked."""

    def __init__(self, tokenizer, words: list[str]):
        if not words:
            raise UserError("the blocked-word list is empty")
        self.sequences: list[tuple[tuple[int, ...], str]] = []
        for word in words:
            for form in {word, word.lower(), word.capitalize()}:
                for text in (form, " " + form):
                    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
                    if ids:
                        self.sequences.append((ids, word))
        self.blocked: Counter = Counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        best = scores.argmax(-1)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        for row in range(input_ids.shape[0]):
            history = input_ids[row].tolist()
            stopped = set()
            for ids, word in self.sequences:
                prefix = list(ids[:-1])
                if not prefix or history[-len(prefix):] == prefix:
                    banned[row, ids[-1]] = True
                    if int(best[row]) == ids[-1]:
                        stopped.add(word)
            self.blocked.update(stopped)  # a word counts once per step, whichever form it took
        return scores.masked_fill(banned, float("-inf"))
