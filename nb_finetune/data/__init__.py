"""Data: load a table from anywhere, map its columns to a task, check it, split it; then its
tokens (`data.formatter`, `data.tokens`, `data.collator`, `data.token_cache`).

The table side is plain pandas: a normalised frame per split and a `DataReport` of everything
worth knowing before training. It imports no torch.
"""
from .columns import frame_digest, key_text, normalize
from .loading import read_table, resolve_source
from .prepare import PreparedData, completion_sample, prepare
from .report import DataReport, build_report
from .split import clean, split

__all__ = ["DataReport", "PreparedData", "build_report", "clean", "completion_sample", "frame_digest", "key_text", "normalize",
           "prepare", "read_table", "resolve_source", "split"]
