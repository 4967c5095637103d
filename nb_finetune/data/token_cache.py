"""The token cache: each split's encoded rows kept on disk, read back when the same rows are
tokenized the same way again (a re-run, a restarted kernel, new LoRA or training settings)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from . import formatter
from .columns import frame_digest

TOKEN_CACHE_BYTES = 2 * 2**30  # the token cache keeps its most recently used entries up to this size


def _fingerprint(frame: pd.DataFrame, fmt: formatter.Formatter, head_labels: dict | None) -> str:
    """Everything a split's tokens depend on: the formatter's code (a change to how rows are
    encoded makes every entry stale), the tokenizer's whole definition (vocabulary, merges,
    normalizer, pre- and post-processing, added tokens) and its chat template and special
    tokens, the formatter's settings, the class indices of a head, and every row's values."""
    tok = fmt.tokenizer
    digest = hashlib.sha256(Path(formatter.__file__).read_bytes())
    digest.update(tok.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([type(tok).__name__, getattr(tok, "chat_template", None), tok.special_tokens_map,
                              sorted(tok.all_special_ids), fmt.max_length, fmt.use_chat, fmt.instruction,
                              fmt.labels, head_labels], default=str, sort_keys=True).encode())
    digest.update(frame_digest(frame).encode())
    return digest.hexdigest()[:40]


def cached(folder: Path, frame: pd.DataFrame, fmt: formatter.Formatter, head_labels: dict | None, encode, progress=None
            ) -> list[dict]:
    """encode(), or the rows it encoded the last time it was asked for the same fingerprint.
    A missing, unreadable or damaged entry is encoded again; a folder that cannot be written
    costs only that."""
    path = Path(folder) / f"{_fingerprint(frame, fmt, head_labels)}.npz"
    try:
        encoded = _load_encoded(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # not there, or damaged (a write cut short by a full disk, say): encode again and replace it
    else:
        try:
            os.utime(path)  # used now: eviction removes the least recently used first
        except OSError:
            pass  # a cache someone else owns: read it all the same
        if progress:
            progress(f"tokens of {len(encoded):,} rows read from the cache ({path.parent})")
        return encoded
    encoded = encode()
    try:
        _save_encoded(path, encoded)
        _evict(path.parent, TOKEN_CACHE_BYTES)
    except OSError:
        pass
    return encoded


def _save_encoded(path: Path, encoded: list[dict]) -> None:
    """The rows as flat int32 arrays with their lengths (numpy's npz: no pickle when read back),
    written to a temporary file and renamed, so a reader never sees half an entry. One larger
    than the whole cache is not written: eviction would remove it at once."""
    lengths = np.fromiter((len(f["input_ids"]) for f in encoded), np.int64, len(encoded))
    total = int(lengths.sum())
    if total * 8 > TOKEN_CACHE_BYTES:
        return
    ids = np.fromiter(itertools.chain.from_iterable(f["input_ids"] for f in encoded), np.int32, total)
    per_row = not isinstance(encoded[0]["labels"], list)  # a head's class index, one per row
    labels = (np.array([f["labels"] for f in encoded], np.int64) if per_row else
              np.fromiter(itertools.chain.from_iterable(f["labels"] for f in encoded), np.int32, total))
    flags = np.array([(f["prompt_truncated"], f["response_truncated"]) for f in encoded], bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, labels=labels, lengths=lengths, flags=flags, per_row=per_row)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_encoded(path: Path) -> list[dict]:
    with np.load(path) as entry:
        ids, labels, lengths, flags = entry["ids"], entry["labels"], entry["lengths"], entry["flags"]
        per_row = bool(entry["per_row"])
    if int(lengths.sum()) != len(ids) or len(flags) != len(lengths) or \
            len(labels) != (len(lengths) if per_row else len(ids)):
        raise ValueError(f"{path}: inconsistent token cache entry")
    bounds = np.cumsum(lengths)[:-1]
    row_labels = labels.tolist() if per_row else [part.tolist() for part in np.split(labels, bounds)]
    return [{"input_ids": part.tolist(), "labels": lab, "prompt_truncated": bool(cut), "response_truncated": bool(lost)}
            for part, lab, (cut, lost) in zip(np.split(ids, bounds), row_labels, flags)]


def _evict(folder: Path, limit: int) -> None:
    """Remove the least recently used entries beyond `limit` bytes, and temporary files a
    crashed writer left a day ago or more."""
    entries = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:  # another process removed it
            continue
        if p.suffix == ".tmp" and time.time() - st.st_mtime > 86400:
            p.unlink(missing_ok=True)
        elif p.suffix == ".npz":
            entries.append((st.st_mtime, st.st_size, p))
    kept = 0
    for _, size, p in sorted(entries, reverse=True):
        kept += size
        if kept > limit:
            p.unlink(missing_ok=True)
