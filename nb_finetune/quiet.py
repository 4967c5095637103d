"""One place that quiets the libraries: front ends show their own progress, and library
progress bars and notices would print from a training thread into whatever cell is running."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_notices() -> None:
    """Raise the level of loggers that speak while their library is imported, so call this
    before importing it: bitsandbytes warns, on CPUs with AVX-512 BF16, about optional kernels
    it cannot fetch, and peft imports it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_notices()
    # train.report_to: mlflow's local store announces the tables it creates at a run's start.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # peft asks transformers a deprecated question each time it wraps a model; nothing a user can change.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
