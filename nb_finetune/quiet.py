"""One place that quiets the libraries: front ends show their own progress, and library
progress bars and notices would print from a training thread into whatever cell is running."""
from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
