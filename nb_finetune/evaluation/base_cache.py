"""The base model's results, kept: evaluation, probes and panels share one cache.

Training the adapter again does not change the base model, so what the base scored or wrote
(its test scores, samples, probe results) stands while the base, its settings and the inputs
stay the same. The key names all of those; a result is reused only for an equal key."""
from __future__ import annotations

import contextlib
from collections import OrderedDict


def as_base(model):
    """Context in which the model behaves as the base: its LoRA adapter switched off."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class BaseResults:
    """Results computed on the base model, by key; the least recently used go past `limit`."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.results: OrderedDict = OrderedDict()
        self.reused = False  # whether the last on_base call found its result kept

    def __contains__(self, key) -> bool:
        return key in self.results

    def on_base(self, model, key, compute, progress=None, what: str = ""):
        """compute() with the adapter switched off, or its result from an earlier call with
        this key (None: never kept, e.g. a scorer that may change between calls)."""
        self.reused = key is not None and key in self.results
        if self.reused:
            if progress and what:
                progress(f"the base model's {what}: from an earlier run (training does not change the base)")
            self.results.move_to_end(key)
            return self.results[key]
        with as_base(model):
            value = compute()
        if key is not None:
            self.results[key] = value
            while len(self.results) > self.limit:
                self.results.popitem(last=False)
        return value
