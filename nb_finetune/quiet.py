"""One place that quiets the libraries: front ends show their own progress, and library
progress bars and notices would print from a training thread into whatever cell is running.

Nothing here runs at import. A front end quiets the libraries for the work it starts
(`quieted()`, and `loading_quietly()` around the imports that load bitsandbytes), and
everything it changed is put back when the last such piece of work ends.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from contextlib import contextmanager

# train.report_to: mlflow's local store announces the tables it creates at a run's start.
LOGGER_LEVELS = {"bitsandbytes": logging.ERROR, "mlflow.store.db.utils": logging.WARNING}
# Warnings nothing a user sets can change, by message and category: peft asks transformers a
# deprecated question each time it wraps a model.
NAMED_WARNINGS = ((".*is_gradient_checkpointing.* is deprecated", FutureWarning),)


@contextmanager
def loading_quietly():
    """bitsandbytes logs while it is imported (on CPUs with AVX-512 BF16, about optional kernels
    it cannot fetch), and peft and transformers' Trainer import it: its logger is raised for
    the imports inside and put back after."""
    logger = logging.getLogger("bitsandbytes")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


class _Quiet:
    """Counts the pieces of work running (a training thread and a panel's click may overlap):
    the first one in quiets the libraries, the last one out puts back what was there."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: dict = {}

    def enter(self) -> None:
        with self.lock:
            self.depth += 1
            if self.depth == 1:
                self.saved = apply()

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                restore(self.saved)


_QUIET = _Quiet()


@contextmanager
def quieted():
    """The libraries quiet for the work inside: named warnings filtered, library loggers and
    transformers' verbosity raised, its progress bars off, tokenizers' threads left alone."""
    _QUIET.enter()
    try:
        yield
    finally:
        _QUIET.exit()


def apply() -> dict:
    """Quiet the libraries; returns what was there before, for `restore`."""
    import transformers
    tf_logging = transformers.logging
    saved = {"env": os.environ.get("TOKENIZERS_PARALLELISM"),
             "levels": {name: logging.getLogger(name).level for name in LOGGER_LEVELS},
             "verbosity": tf_logging.get_verbosity(), "bars": tf_logging.is_progress_bar_enabled(),
             "filters": []}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in NAMED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
        saved["filters"].append(warnings.filters[0])
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    return saved


def restore(saved: dict) -> None:
    import transformers
    tf_logging = transformers.logging
    if saved["env"] is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    for name, level in saved["levels"].items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = [f for f in warnings.filters if f not in saved["filters"]]
    tf_logging.set_verbosity(saved["verbosity"])
    if saved["bars"]:
        tf_logging.enable_progress_bar()
