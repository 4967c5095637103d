"""Batches: the collator that pads them, which positions are trained, and the previews of one
row's tokens and of a batch's padding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .formatter import IGNORE, Formatter


@dataclass
class CompletionOnlyCollator:
    """Pads a batch dynamically (to its longest row, rounded up to `pad_to_multiple_of`).

    Labels arrive already masked by `Formatter.encode` (prompt = -100); padding gets -100
    by position. Sequence-classification rows (int labels) pass
    through with their class index.
    """
    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest  # ceil to a multiple of m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        per_token = not isinstance(features[0]["labels"], (int, np.integer))
        labels = torch.full((n, width), IGNORE, dtype=torch.long) if per_token else \
            torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        packed = "position_ids" in features[0]
        if packed:
            # Padding restarts at position 0: a sequence of its own that no real token attends to.
            positions = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            cols = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
            input_ids[i, cols] = torch.as_tensor(f["input_ids"])
            attention[i, cols] = 1
            if per_token:
                labels[i, cols] = torch.as_tensor(f["labels"])
            if packed:
                pads = slice(k, width) if self.padding_side == "right" else slice(0, width - k)
                positions[i, cols] = torch.as_tensor(f["position_ids"])
                positions[i, pads] = torch.arange(width - k)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if packed:
            # attention_mask still counts the real tokens; the model must get position_ids
            # without it (training.trainer), or the packed rows would see each other.
            batch["position_ids"] = positions
        return batch


def trained_positions(labels):
    """For a causal LM batch: which positions predict a trained token (bool, batch x length),
    and those tokens in order. Position t predicts the token at t + 1."""
    following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = following != IGNORE
    return keep, following[keep]


# -- preview: what one row and one batch look like ----------------------------------------

def token_table(fmt: Formatter, row, pad_to: int = 0) -> pd.DataFrame:
    """One row's tokens after encoding and collating: id, text, role and the label the loss sees.

    role: 'response' (trained), 'prompt' (not trained), 'special' (a special token not trained)
    or 'padding' (added by the collator up to `pad_to` tokens)."""
    f = fmt.encode(row)
    ids, labels = f["input_ids"], f["labels"]
    special = set(fmt.tokenizer.all_special_ids)
    pad_id = fmt.tokenizer.pad_token_id
    pad = max(0, pad_to - len(ids))
    rows = [{"id": i, "token": fmt.tokenizer.decode([i]), "label": lab,
             "role": "response" if lab != IGNORE else "special" if i in special else "prompt"}
            for i, lab in zip(ids, labels)]
    rows += [{"id": pad_id, "token": fmt.tokenizer.decode([pad_id]), "label": IGNORE, "role": "padding"}] * pad
    out = pd.DataFrame(rows, columns=["id", "token", "label", "role"])
    out.attrs.update(prompt_truncated=f["prompt_truncated"], response_truncated=f["response_truncated"])
    return out


def batch_padding(lengths: list[int], batch_size: int, pad_to_multiple_of: int = 0) -> dict:
    """Padding share when rows of these lengths are batched in order, with and without rounding
    each batch's width up to a multiple (e.g. 8: widths 13 and 21 become 16 and 24)."""
    def padded(multiple: int) -> int:
        total = 0
        for start in range(0, len(lengths), batch_size):
            chunk = lengths[start:start + batch_size]
            width = max(chunk)
            if multiple:
                width = -(-width // multiple) * multiple
            total += width * len(chunk)
        return total

    real = sum(lengths)
    plain, rounded = padded(0), padded(pad_to_multiple_of)
    return {"rows": len(lengths), "tokens": real, "padding_share": 1 - real / plain if plain else 0.0,
            "padding_share_rounded": 1 - real / rounded if rounded else 0.0,
            "extra_tokens_from_rounding": rounded - plain}
