"""Scoring: log-probabilities of trained tokens, label scores (a shared prompt run once),
head scores, completion loss, greedy generation, and classification metrics."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ..data.collator import CompletionOnlyCollator, trained_positions
from ..data.formatter import IGNORE, Formatter
from ..data.tokens import TokenizedDataset
from ..modeling import keeps_logits_selectively


def autocast(model, precision: str):
    if precision in ("bfloat16", "float16"):
        return torch.autocast(model.device.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()


@torch.inference_mode()
def sequence_logprobs(model, features: list[dict], collator, batch_size: int, precision: str) -> np.ndarray:
    """Sum of log-probabilities of each row's trained tokens.

    Where the model takes `logits_to_keep`, the vocabulary projection and the softmax run only
    at the positions that predict a trained token: scoring a label after a 250-token prompt
    needs two positions' logits, not 250."""
    selective = keeps_logits_selectively(model)
    out = []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(model.device) for k, v in collator(features[i:i + batch_size]).items()}
        keep, following = trained_positions(batch["labels"])
        with autocast(model, precision):
            if selective:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=keep).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
        out.append(row_sums(logits, keep, following))
    return np.concatenate(out) if out else np.zeros(0)


def row_sums(logits, keep, following) -> np.ndarray:
    """Each row's summed log-probability of its trained tokens, from the logits at the kept
    positions (in order) and the tokens they predict."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, following.unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]  # the row of each kept position, in order
    return torch.zeros(len(keep), dtype=torch.float32, device=picked.device).index_add_(0, rows, picked).cpu().numpy()


def score_labels(model, fmt: Formatter, frame: pd.DataFrame, labels: list[str], collator,
                 batch_size: int = 8, precision: str = "float32", shared_prompt: bool = True) -> np.ndarray:
    """[rows, labels] log-likelihood of each label as the response to each row's prompt.

    With `shared_prompt` (and more than one label), each prompt runs once and every label
    continues from it (`shared_prompt_logprobs`); otherwise every (prompt, label) sequence runs
    whole."""
    response_col = "label" if "label" in frame else "completion"
    features = fmt.encode_many([row | {response_col: lab} for row in frame.to_dict(orient="records")
                                for lab in labels])
    if shared_prompt and len(labels) > 1:
        per_row = [features[i:i + len(labels)] for i in range(0, len(features), len(labels))]
        scores = shared_prompt_logprobs(model, per_row, collator, batch_size, precision)
        if scores is not None:
            return scores
    scores = sequence_logprobs(model, features, collator, batch_size, precision)
    return scores.reshape(len(frame), len(labels))


def label_probabilities(model, fmt: Formatter, texts: list[str], labels: list[str], objective: str,
                        batch_size: int = 8, precision: str = "float32") -> np.ndarray:
    """[texts, labels]: the probability of each label for each text, scored as the evaluation
    scores test rows (the head's, or each label's likelihood as the response), normalised
    over the labels."""
    collator = CompletionOnlyCollator(fmt.tokenizer.pad_token_id)
    if objective == "head":
        rows = [{"text": t, "label": labels[0]} for t in texts]  # the label is not read, only encoded
        dataset = TokenizedDataset(fmt.encode_classification_many(rows, {lab: i for i, lab in enumerate(labels)}))
        logp = head_scores(model, dataset, collator, batch_size, precision)
    else:
        logp = score_labels(model, fmt, pd.DataFrame({"text": texts}), labels, collator, batch_size, precision)
    logp = logp - logp.max(axis=1, keepdims=True)
    return np.exp(logp) / np.exp(logp).sum(axis=1, keepdims=True)


def shared_length(features: list[dict]) -> int:
    """How many leading tokens all of one row's label sequences share, stopping short of the
    position that predicts the first trained token (each label's pass needs that position's
    output as its first). Usually the whole prompt; shorter where cutting a long prompt to
    max_length left labels of different lengths with different prompt tokens."""
    ids = [f["input_ids"] for f in features]
    first_trained = min(next((i for i, x in enumerate(f["labels"]) if x != IGNORE), len(f["labels"]))
                        for f in features)
    limit = min(first_trained - 1, min(len(x) for x in ids))
    n = 0
    while n < limit and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


@torch.inference_mode()
def shared_prompt_logprobs(model, per_row: list[list[dict]], collator, batch_size: int,
                           precision: str) -> np.ndarray | None:
    """[rows, labels]: what `sequence_logprobs` gives for each row's label sequences, with the
    prompt they share run once.

    Scoring k labels after a 250-token prompt as k whole sequences runs the prompt k times. Here
    the prompts of a batch run once, keeping their keys and values (the model's cache); each
    label then runs as a few tokens on top, and is cropped off the cache before the next. Prompts
    are right-padded, so the padding sits between a short prompt and its label: the attention
    mask hides it and position ids carry on from the prompt's real length. None where this does
    not apply (a model whose cache cannot be cropped back, or a row with no shared prompt)."""
    shared = [shared_length(feats) for feats in per_row]
    if not per_row or min(shared) < 1:
        return None
    out = np.zeros((len(per_row), len(per_row[0])), dtype=np.float32)
    # Right-padded to the longest row only: padding rounded up would run in every label's pass.
    collate = dataclasses.replace(collator, pad_to_multiple_of=None, padding_side="right")
    cache_arg = _cache_argument(model)
    for start in range(0, len(per_row), batch_size):
        rows = list(range(start, min(start + batch_size, len(per_row))))
        prompt = _run_prompts(model, collate, [per_row[r][0]["input_ids"][:shared[r]] for r in rows], cache_arg,
                              precision)
        if prompt is None:
            return None
        for j in range(out.shape[1]):
            tails = [{"input_ids": per_row[r][j]["input_ids"][shared[r]:], "labels": per_row[r][j]["labels"][shared[r]:]}
                     for r in rows]
            scores = _run_label(model, collate, tails, prompt, [shared[r] for r in rows], cache_arg, precision)
            if scores is None:
                return None
            out[rows, j] = scores
    return out


def _cache_argument(model) -> str:
    """The forward argument that takes the cache: transformers 5.x renamed `past_key_values` to
    `cache` (argument and output) along the way."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@dataclasses.dataclass
class _Prompts:
    """A batch of prompts run once: the cache of their keys and values, their attention mask
    and their padded width."""
    cache: object
    mask: torch.Tensor
    width: int


def _run_prompts(model, collate, prompts: list[list[int]], cache_arg: str, precision: str) -> _Prompts | None:
    """The prompts through the model, keeping the cache; None where it cannot be cropped back."""
    batch = collate([{"input_ids": ids, "labels": [IGNORE] * len(ids)} for ids in prompts])
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    # The prompt pass needs no logits at all; one position's is the least a causal LM computes.
    take_one = {"logits_to_keep": 1} if keeps_logits_selectively(model) else {}
    with autocast(model, precision):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **take_one)
    cache = out.get(cache_arg)
    if cache is None or not getattr(cache, "is_croppable", False):
        return None
    return _Prompts(cache, mask, ids.shape[1])


def _run_label(model, collate, tails: list[dict], prompts: _Prompts, lengths: list[int], cache_arg: str,
               precision: str) -> np.ndarray | None:
    """Each row's summed log-probability of one label's trained tokens, run on top of the
    prompts' cache and cropped off it again; None where the crop did not restore the cache."""
    device = model.device
    batch = {k: v.to(device) for k, v in collate(tails).items()}
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tail_width = ids.shape[1]
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(tail_width, device=device)
    with autocast(model, precision):
        logits = model(input_ids=ids, attention_mask=torch.cat([prompts.mask, mask], dim=1),
                       position_ids=positions, use_cache=True, **{cache_arg: prompts.cache}).logits
    prompts.cache.crop(-tail_width)  # negative: remove that many; a positive argument changed meaning in 5.x
    if prompts.cache.get_seq_length() != prompts.width:
        return None
    keep, following = trained_positions(labels)
    return row_sums(logits[keep], keep, following)


@torch.inference_mode()
def head_scores(model, dataset: TokenizedDataset, collator, batch_size: int = 8, precision: str = "float32"
                ) -> np.ndarray:
    out = []
    for i in range(0, len(dataset), batch_size):
        batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        with autocast(model, precision):
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits
        out.append(torch.log_softmax(logits.float(), -1).cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def completion_loss(model, dataset: TokenizedDataset, collator, batch_size: int = 8, precision: str = "float32"
                    ) -> tuple[float, np.ndarray]:
    """Mean loss per completion token over the data set, and each row's mean loss."""
    features = [dataset[i] for i in range(len(dataset))]
    totals = sequence_logprobs(model, features, collator, batch_size, precision)
    counts = np.array([sum(1 for x in f["labels"][1:] if x != IGNORE) for f in features])
    return float(-totals.sum() / max(counts.sum(), 1)), -totals / np.maximum(counts, 1)


def classification_metrics(y_true, y_pred, labels: list[str]) -> tuple[dict, pd.DataFrame]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for lab in labels:
        tp = np.sum((y_pred == lab) & (y_true == lab))
        fp = np.sum((y_pred == lab) & (y_true != lab))
        fn = np.sum((y_pred != lab) & (y_true == lab))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    confusion = pd.crosstab(pd.Categorical(y_true, categories=labels), pd.Categorical(y_pred, categories=labels),
                            rownames=["true"], colnames=["predicted"], dropna=False)
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_f1": float(np.mean(f1s))}, confusion


@torch.inference_mode()
def generate(model, fmt: Formatter, frame: pd.DataFrame, max_new_tokens: int, precision: str = "float32"
             ) -> list[str]:
    tok = fmt.tokenizer
    outs = []
    for row in frame.to_dict(orient="records"):
        ids = torch.tensor([fmt.prompt_ids(row)], device=model.device)
        with autocast(model, precision):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def bootstrap_ci(values, stat: Callable = np.mean, n: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over resampled rows (rows resampled together
    when `values` is 2-D)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))
