"""The order of the training rows: grouped by length, as transformers groups them, then the
steps shuffled, so the live curves follow the model and not the rows' lengths."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


def shuffled_length_groups(lengths: list[int], step_rows: int, generator=None) -> list[int]:
    """Row indices whose every `step_rows` in a row are of similar length (the same groups, so the
    same padding, as transformers' `group_by_length`), with the steps in random order.

    transformers sorts each megabatch (up to 50 steps' rows) from its longest rows to its
    shortest. Trained in that order, the loss and tokens/s of consecutive steps follow the
    lengths: a sawtooth as long as a megabatch. Here each step keeps its rows, and the steps are
    shuffled over the epoch; the longest step stays first, so running out of memory happens at once."""
    grouped = get_length_grouped_indices(lengths, step_rows, generator=generator)
    steps = [grouped[i:i + step_rows] for i in range(0, len(grouped), step_rows)]
    # A last, shorter step stays last: under drop_last it is the one the DataLoader leaves out.
    whole, rest = (steps[:-1], steps[-1:]) if len(steps[-1]) < step_rows else (steps, [])
    if len(whole) > 1:
        order = torch.randperm(len(whole) - 1, generator=generator) + 1
        whole = [whole[0]] + [whole[i] for i in order.tolist()]
    return [i for step in whole + rest for i in step]


class ShuffledLengthGroupedSampler(Sampler):
    """`shuffled_length_groups` as a sampler: a new order each epoch, from torch's generator
    (the Trainer seeds it, and restores it on resume, as for transformers' own sampler)."""

    def __init__(self, lengths: list[int], step_rows: int, generator=None):
        self.lengths, self.step_rows, self.generator = list(lengths), step_rows, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(shuffled_length_groups(self.lengths, self.step_rows, self.generator))


def step_order_shares(lengths: list[int], order: list[int], step_rows: int) -> dict:
    """How an order of rows pads, and how much the steps' lengths follow each other: the padding
    share (each step padded to its longest row) and the correlation of consecutive steps' longest
    rows (near 1 for a sawtooth, near 0 for steps in random order)."""
    import numpy as np
    steps = [order[i:i + step_rows] for i in range(0, len(order), step_rows)]
    longest = np.array([max(lengths[i] for i in s) for s in steps], dtype=float)
    real = sum(lengths[i] for i in order)
    padded = float(sum(longest[k] * len(s) for k, s in enumerate(steps)))
    follow = float(np.corrcoef(longest[:-1], longest[1:])[0, 1]) if len(steps) > 2 else float("nan")
    return {"padding_share": 1 - real / padded if padded else 0.0, "consecutive_correlation": follow}
