"""Batches: the collator that pads them, which positions are trained, and the previews of one
row's tokens and of a batch's padding."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .formatter import IGNORE, Formatter


@dataclass
class PaddingTally:
    """The tokens of the batches a collator built: the rows' own, what padding each batch to its
    longest row would make of them, and what the batches held as built."""
    tokens: int = 0
    padded: int = 0
    built: int = 0

    def add(self, tokens: int, padded: int, built: int) -> None:
        self.tokens, self.padded, self.built = self.tokens + tokens, self.padded + padded, self.built + built

    def shares(self) -> dict:
        """Padding tokens / all tokens in the batches, padded ('before') and as built ('after')."""
        return {"batches_padded": 1 - self.tokens / self.padded if self.padded else 0.0,
                "as_built": 1 - self.tokens / self.built if self.built else 0.0}

    def summary(self) -> str:
        shares = self.shares()
        return (f"padding share of the training batches: {shares['batches_padded']:.1%} padded to each batch's "
                f"longest row, {shares['as_built']:.1%} as trained ({self.tokens:,} tokens of rows)")


@dataclass
class CompletionOnlyCollator:
    """Pads a batch dynamically (to its longest row, rounded up to `pad_to_multiple_of`).

    Labels arrive already masked by `Formatter.encode` (prompt = -100); padding gets -100
    by position. Sequence-classification rows (int labels) pass
    through with their class index.

    With `flatten` (padding-free batches), a causal-LM batch that padding would grow becomes one
    row: the rows end to end with position ids restarting at each (see `flattened`). With a
    `tally`, every batch built is counted there (its padding share).
    """
    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    padding_side: str = "right"
    flatten: bool = False
    tally: PaddingTally | None = field(default=None, repr=False, compare=False)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = self.width(features)
        tokens = sum(len(f["input_ids"]) for f in features)
        # A batch with no padding to save is left as it is: one long row gains it nothing.
        batch = self.flattened(features) if self.flatten and per_token(features) and tokens < width * len(features) \
            else self.padded(features, width)
        if self.tally is not None:
            self.tally.add(tokens, width * len(features), batch["input_ids"].numel())
        return batch

    def width(self, features: list[dict]) -> int:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        return -(-longest // m) * m if m else longest  # ceil to a multiple of m

    def padded(self, features: list[dict], width: int) -> dict[str, torch.Tensor]:
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        token_labels = per_token(features)
        labels = torch.full((n, width), IGNORE, dtype=torch.long) if token_labels else \
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
            if token_labels:
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

    @staticmethod
    def flattened(features: list[dict]) -> dict[str, torch.Tensor]:
        """The batch as one row of all its tokens (transformers' DataCollatorWithFlattening layout):
        position ids restart at 0 for each row (a packed row keeps its own), from which the model
        keeps each row's attention to itself (training.trainer passes no attention mask). Each
        row's first label is not trained: it would be predicted from the row before; padded, it
        is never predicted either."""
        ids, labels, positions = [], [], []
        for f in features:
            ids += list(f["input_ids"])
            labels += [IGNORE, *list(f["labels"])[1:]]
            positions += list(f.get("position_ids", range(len(f["input_ids"]))))
        # attention_mask counts the real tokens (all of them), as for packed rows.
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
                "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])}


@dataclass
class PairCollator(CompletionOnlyCollator):
    """Preference pairs as one batch of 2B rows, the B chosen answers then the B rejected ones,
    padded together, so one forward pass scores both sides (training.preference). Pairs are
    never flattened: each side is a row of its own."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        rows += [{"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]} for f in features]
        width = self.width(rows)
        batch = self.padded(rows, width)
        if self.tally is not None:
            self.tally.add(sum(len(r["input_ids"]) for r in rows), width * len(rows), batch["input_ids"].numel())
        return batch


def per_token(features: list[dict]) -> bool:
    """Whether the rows carry a label per token (a causal LM), not one class index each (a head)."""
    return not isinstance(features[0]["labels"], (int, np.integer))


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


def pair_token_tables(fmt: Formatter, chosen_row: dict, rejected_row: dict, pad_to: int = 0) -> dict:
    """One preference pair's tokens (each side a completion row, data.tokens.side_rows): the
    prompt both sides share (their common first tokens) and each answer's tokens after it, as
    `token_table` frames under 'prompt', 'chosen' and 'rejected'; `pad_to` pads both answers as
    PairCollator pads the batch."""
    chosen, rejected = token_table(fmt, chosen_row, pad_to), token_table(fmt, rejected_row, pad_to)
    shared = 0
    for a, b, role in zip(chosen["id"], rejected["id"], chosen["role"]):
        if a != b or role == "response":
            break
        shared += 1
    return {"prompt": chosen.iloc[:shared].reset_index(drop=True),
            "chosen": chosen.iloc[shared:].reset_index(drop=True),
            "rejected": rejected.iloc[shared:].reset_index(drop=True)}


def pair_batch_stats(chosen: list[dict], rejected: list[dict], batch_size: int, pad_to_multiple_of: int = 0) -> dict:
    """Encoded pairs (each side's `Formatter.encode` rows, in order) batched as PairCollator
    batches them, `batch_size` pairs padded together to one width: tokens and trained tokens per
    side, the prompt's share of the tokens, how often the chosen answer has more trained tokens,
    and the padding share."""
    def trained(rows):
        return np.array([sum(x != IGNORE for x in r["labels"]) for r in rows])

    lengths = {name: np.array([len(r["input_ids"]) for r in rows]) for name, rows in (("chosen", chosen),
                                                                                     ("rejected", rejected))}
    answers = {"chosen": trained(chosen), "rejected": trained(rejected)}
    ordered = []  # the rows as PairCollator lays each batch out: its chosen rows, then its rejected rows
    for start in range(0, len(chosen), batch_size):
        ordered += list(lengths["chosen"][start:start + batch_size]) + list(lengths["rejected"][start:start + batch_size])
    padding = batch_padding(ordered, 2 * batch_size, pad_to_multiple_of)
    total = int(lengths["chosen"].sum() + lengths["rejected"].sum())
    return {"pairs": len(chosen), "tokens_chosen": float(lengths["chosen"].mean()),
            "tokens_rejected": float(lengths["rejected"].mean()), "trained_chosen": float(answers["chosen"].mean()),
            "trained_rejected": float(answers["rejected"].mean()),
            "prompt_share": 1 - int(answers["chosen"].sum() + answers["rejected"].sum()) / total if total else 0.0,
            "chosen_longer": float(np.mean(answers["chosen"] > answers["rejected"])),
            "padding_share": padding["padding_share"], "padding_share_rounded": padding["padding_share_rounded"],
            "prompt_truncated": sum(c["prompt_truncated"] or r["prompt_truncated"] for c, r in zip(chosen, rejected)),
            "response_truncated": sum(c["response_truncated"] or r["response_truncated"]
                                      for c, r in zip(chosen, rejected))}
