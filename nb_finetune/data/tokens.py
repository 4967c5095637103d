"""Tokenized splits: encode every row (through the token cache), count what truncation did, and
pack short rows together."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import UserError
from .formatter import IGNORE, Formatter
from .token_cache import cached


@dataclass
class TokenizationStats:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_no_trained: int = 0
    lengths: list = field(default_factory=list, repr=False)

    def summary(self, max_length: int) -> str:
        lengths = np.asarray(self.lengths or [0])
        return (f"{self.rows:,} rows, {self.tokens:,} tokens ({self.trained_tokens:,} trained), length median "
                f"{np.median(lengths):.0f} / 95th percentile {np.percentile(lengths, 95):.0f} / max {lengths.max()}; "
                f"max_length {max_length}: {self.prompt_truncated} prompts cut in the middle, "
                f"{self.response_truncated} responses cut, {self.dropped_no_trained} rows dropped "
                "with no trained token left")


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        f = self.features[i]
        item = {"input_ids": f["input_ids"], "labels": f["labels"]}
        if "position_ids" in f:  # a packed row
            item["position_ids"] = f["position_ids"]
        return item


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of rows grouped so that each group holds at most max_length tokens.

    Best fit, longest rows first: each row goes into the fullest group it still fits in. Kept
    in a list sorted by free space, so a data set of 100k rows packs in about a second."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, group index), ascending
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            groups.append([i])
            bisect.insort(free, (max_length - n, len(groups) - 1))
        else:
            room, g = free.pop(at)
            groups[g].append(i)
            bisect.insort(free, (room - n, g))
    return groups


PACKING_NEEDS_CAUSAL_LM = ("train.packing needs a causal-LM objective: a classification head sees one row per "
                           "input; set train.packing to false")


def pack(dataset: TokenizedDataset, max_length: int) -> TokenizedDataset:
    """Several short rows in one row of at most max_length tokens, none attending to another.

    Each packed row carries position_ids that restart at 0 for every original row. Given
    position_ids and no attention mask, transformers builds a block-diagonal causal mask from
    them, so each original row sees only itself, at its own positions: the same logits as
    unpacked (tests/data/test_packing.py); training.trainer passes packed batches that way. Each
    original row's first label is not trained: it would be predicted from the row before."""
    features = dataset.features
    if features and isinstance(features[0]["labels"], (int, np.integer)):
        raise UserError(PACKING_NEEDS_CAUSAL_LM)
    packed = []
    for group in pack_rows([len(f["input_ids"]) for f in features], max_length):
        input_ids, labels, positions = [], [], []
        for i in group:
            ids = features[i]["input_ids"]
            input_ids += ids
            labels += [IGNORE] + list(features[i]["labels"][1:])
            positions += range(len(ids))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return TokenizedDataset(packed)


def tokenize_frame(frame: pd.DataFrame, fmt: Formatter, head_labels: dict | None = None,
                   cache: Path | None = None, progress=None) -> tuple[TokenizedDataset, TokenizationStats]:
    """Encode every row; rows with no trained token left are dropped and counted.

    With `cache` (a folder), the encoded rows are kept there and read back when the same rows
    are tokenized the same way again (see `token_cache.cached`): a re-run, a restarted kernel,
    new LoRA or training settings on the same data."""
    rows = frame.to_dict(orient="records")

    def encode():
        if head_labels:
            return fmt.encode_classification_many(rows, head_labels, progress)
        return fmt.encode_many(rows, progress)

    encoded = cached(cache, frame, fmt, head_labels, encode, progress) if cache and rows else encode()
    return _keep_trained(encoded, per_row=bool(head_labels))


def _keep_trained(encoded: list[dict], per_row: bool) -> tuple[TokenizedDataset, TokenizationStats]:
    """The encoded rows that keep a trained token, and the counts of what truncation did.
    `per_row`: a head's rows, one class index each (always trained)."""
    stats = TokenizationStats()
    kept = []
    for f in encoded:
        stats.rows += 1
        stats.lengths.append(len(f["input_ids"]))
        stats.prompt_truncated += f["prompt_truncated"]
        stats.response_truncated += f["response_truncated"]
        trained = 1 if per_row else sum(1 for x in f["labels"] if x != IGNORE)
        if trained == 0:
            stats.dropped_no_trained += 1
            continue
        stats.tokens += len(f["input_ids"])
        stats.trained_tokens += trained
        kept.append(f)
    return TokenizedDataset(kept), stats


class PairDataset(TokenizedDataset):
    """Preference pairs: each item's input_ids and labels are its chosen answer's row (what
    length-grouped sampling measures), rejected_input_ids and rejected_labels the other's."""

    def __getitem__(self, i):
        f = self.features[i]
        return {"input_ids": f["input_ids"], "labels": f["labels"], "rejected_input_ids": f["rejected_input_ids"],
                "rejected_labels": f["rejected_labels"]}


def side_rows(frame: pd.DataFrame, side: str) -> pd.DataFrame:
    """One answer of each pair as a completion row: the prompt (or chat) and that answer."""
    if "messages" in frame:
        chats = [list(m) + [{"role": "assistant", "content": a}] for m, a in zip(frame["messages"], frame[side])]
        return pd.DataFrame({"messages": chats})
    return pd.DataFrame({"prompt": frame["prompt"].values, "completion": frame[side].values})


def tokenize_pairs(frame: pd.DataFrame, fmt: Formatter, cache: Path | None = None,
                   progress=None) -> tuple[PairDataset, TokenizationStats]:
    """Encode both answers of every pair (each through the token cache); a pair where either
    side keeps no trained token is dropped and counted. The stats measure each pair by its chosen
    answer's row."""
    sides = {}
    for side in ("chosen", "rejected"):
        rows = side_rows(frame, side)
        records = rows.to_dict(orient="records")

        def encode(records=records):
            return fmt.encode_many(records, progress)

        sides[side] = cached(cache, rows, fmt, None, encode, progress) if cache and records else encode()
    pairs = []
    for c, r in zip(sides["chosen"], sides["rejected"]):
        pairs.append(c | {"rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"],
                          "prompt_truncated": c["prompt_truncated"] or r["prompt_truncated"],
                          "response_truncated": c["response_truncated"] or r["response_truncated"]})
    kept, stats = _keep_trained(pairs, per_row=False)
    whole = [f for f in kept.features if any(x != IGNORE for x in f["rejected_labels"])]
    stats.dropped_no_trained += len(kept) - len(whole)
    return PairDataset(whole), stats
