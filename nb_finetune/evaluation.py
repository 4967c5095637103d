"""Evaluation on the held-out test split, always beside baselines.

- Label tasks (classification, or completions that are a few short labels): the model
  "picks" the label whose tokens it finds most likely after the prompt (the sum of
  log-probabilities of the label's trained tokens, end-of-turn included). Accuracy,
  macro-F1 and a confusion matrix, for the tuned model, the base model (adapter switched
  off: zero-shot) and the majority class of the training split. Each prompt runs once and
  every label continues from it.
- Free completions: loss and perplexity on completion tokens.
- A table of the worst errors and generated samples, base and tuned side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import hardware, memory
from .config import EvalConfig
from .tokenization import IGNORE, CompletionOnlyCollator, Formatter, TokenizedDataset


@dataclass
class EvalResult:
    metrics: pd.DataFrame                 # one row per model: tuned, base, majority
    confusion: pd.DataFrame | None        # tuned model, rows = true label, columns = predicted
    errors: pd.DataFrame                  # worst errors of the tuned model
    samples: pd.DataFrame                 # prompt, reference, base, tuned
    predictions: pd.DataFrame             # one row per test row

    def summary(self) -> str:
        return self.metrics.to_string(float_format=lambda v: f"{v:.3f}")

    def _repr_html_(self) -> str:
        from .display import eval_html
        return eval_html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())


def label_candidates(prep) -> list[str]:
    """The label words when the task's answers are a few short labels, else []."""
    if prep.task == "classification":
        return list(prep.labels)
    completions = prep.splits["train"].get("completion")
    if completions is None:
        return []
    unique = completions.unique()
    if 2 <= len(unique) <= 20 and max(len(u) for u in unique) <= 40:
        return sorted(unique)
    return []


def _autocast(model, precision: str):
    if precision in ("bfloat16", "float16"):
        return torch.autocast(model.device.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()


@torch.inference_mode()
def sequence_logprobs(model, features: list[dict], collator, batch_size: int, precision: str,
                      selective: bool | None = None) -> np.ndarray:
    """Sum of log-probabilities of each row's trained tokens.

    The vocabulary projection and the softmax run only at the positions that predict a trained
    token (`logits_to_keep`, where the model takes it; `selective=False` computes every
    position's, for comparison): scoring a label after a 250-token prompt needs two positions'
    logits, not 250."""
    from .engine import keeps_logits_selectively, trained_positions
    if selective is None:
        selective = keeps_logits_selectively(model)
    out = []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(model.device) for k, v in collator(features[i:i + batch_size]).items()}
        keep, following = trained_positions(batch["labels"])
        with _autocast(model, precision):
            if selective:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=keep).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
        out.append(_row_sums(logits, keep, following))
    return np.concatenate(out) if out else np.zeros(0)


def _row_sums(logits, keep, following) -> np.ndarray:
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


def _shared_length(features: list[dict]) -> int:
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
    from .engine import keeps_logits_selectively, trained_positions
    shared = [_shared_length(feats) for feats in per_row]
    if not per_row or min(shared) < 1:
        return None
    n_labels, device = len(per_row[0]), model.device
    out = np.zeros((len(per_row), n_labels), dtype=np.float32)
    # Right-padded to the longest row only: padding rounded up would run in every label's pass.
    collate = dataclasses.replace(collator, pad_to_multiple_of=None, padding_side="right")
    # The prompt pass needs no logits at all; one position's is the least a causal LM computes.
    take_one = {"logits_to_keep": 1} if keeps_logits_selectively(model) else {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.x renamed `past_key_values` to `cache` (argument and output) along the way.
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    for start in range(0, len(per_row), batch_size):
        rows = list(range(start, min(start + batch_size, len(per_row))))
        batch = collate([{"input_ids": per_row[r][0]["input_ids"][:shared[r]], "labels": [IGNORE] * shared[r]}
                         for r in rows])
        prompt, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        width = prompt.shape[1]
        with _autocast(model, precision):
            out_prompt = model(input_ids=prompt, attention_mask=prompt_mask, use_cache=True, **take_one)
        cache = out_prompt.get(cache_arg)
        if cache is None or not getattr(cache, "is_croppable", False):
            return None
        lengths = torch.tensor([shared[r] for r in rows], device=device)
        for j in range(n_labels):
            batch = {k: v.to(device) for k, v in collate(
                [{"input_ids": per_row[r][j]["input_ids"][shared[r]:], "labels": per_row[r][j]["labels"][shared[r]:]}
                 for r in rows]).items()}
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            tail_width = ids.shape[1]
            positions = lengths[:, None] + torch.arange(tail_width, device=device)
            with _autocast(model, precision):
                logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], dim=1),
                               position_ids=positions, use_cache=True, **{cache_arg: cache}).logits
            cache.crop(-tail_width)  # negative: remove that many; a positive argument changed meaning in 5.x
            if cache.get_seq_length() != width:
                return None
            keep, following = trained_positions(labels)
            out[rows, j] = _row_sums(logits[keep], keep, following)
    return out


@torch.inference_mode()
def head_scores(model, dataset: TokenizedDataset, collator, batch_size: int = 8, precision: str = "float32"
                ) -> np.ndarray:
    out = []
    for i in range(0, len(dataset), batch_size):
        batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        with _autocast(model, precision):
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
        with _autocast(model, precision):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def _base(model):
    """Context in which the model behaves as the base: its LoRA adapter switched off."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n // 2 - 2] + " ... " + text[-(n // 2 - 3):]


def _base_once(memo: dict | None, key, compute, progress, what: str):
    """compute() (on the base model), or its result from an earlier evaluation kept in `memo`,
    which the caller keeps only while the base model, the tokens and the test rows stay the same."""
    if memo is not None and key in memo:
        progress(f"the base model's {what}: from the earlier evaluation (training does not change the base)")
        return memo[key]
    value = compute()
    if memo is not None:
        memo[key] = value
    return value


def evaluate(model, fmt: Formatter, prep, objective: str, cfg: EvalConfig, batch_size: int = 8,
             precision: str = "float32", progress=print, base_memo: dict | None = None,
             keep_freed_memory: bool = True) -> EvalResult:
    """The tuned model, and with cfg.baselines the base model (adapter off) and the majority
    class, on the test split. `base_memo`: see `_base_once`. keep_freed_memory: on a CPU,
    batch after batch reuses the memory the last one freed (memory.freed_memory_kept; off
    only to measure what it saves)."""
    with memory.freed_memory_kept(keep_freed_memory and not hardware.cuda_available()):
        return _evaluate(model, fmt, prep, objective, cfg, batch_size, precision, progress, base_memo)


def _evaluate(model, fmt: Formatter, prep, objective: str, cfg: EvalConfig, batch_size: int,
              precision: str, progress, base_memo: dict | None) -> EvalResult:
    test = prep.splits["test"]
    if cfg.max_test_rows and len(test) > cfg.max_test_rows:
        test = test.sample(n=cfg.max_test_rows, random_state=0).reset_index(drop=True)
    collator = CompletionOnlyCollator(fmt.tokenizer.pad_token_id)
    model.eval()
    labels = label_candidates(prep)
    rows, confusion = [], None
    preds = pd.DataFrame({"reference": test["label"] if "label" in test else
                          test.get("completion", pd.Series([""] * len(test)))})
    if labels:
        truth = preds["reference"].to_numpy()
        majority = prep.splits["train"]["label" if "label" in test else "completion"].value_counts().index[0]
        runs = [("tuned", None)] + ([("base", _base)] if cfg.baselines and objective != "head" else [])
        for name, ctx in runs:
            def scored(ctx=ctx, name=name):
                progress(f"evaluating the {name} model on {len(test)} test rows")
                with (ctx(model) if ctx else contextlib.nullcontext()):
                    if objective == "head":
                        ids = {lab: i for i, lab in enumerate(labels)}
                        ds = TokenizedDataset(fmt.encode_classification_many(test.to_dict("records"), ids))
                        return head_scores(model, ds, collator, batch_size, precision)
                    return score_labels(model, fmt, test, labels, collator, batch_size, precision)
            scores = scored() if name == "tuned" else _base_once(
                base_memo, ("label scores", cfg.max_test_rows), scored, progress, "test scores")
            picked = np.asarray(labels)[scores.argmax(1)]
            metrics, conf = classification_metrics(truth, picked, labels)
            rows.append({"model": name, **metrics})
            preds[f"{name}_prediction"] = picked
            if name == "tuned":
                confusion = conf
                probs = np.exp(scores - scores.max(1, keepdims=True))
                probs /= probs.sum(1, keepdims=True)
                preds["tuned_confidence"] = probs.max(1)
        if cfg.baselines:
            metrics, _ = classification_metrics(truth, np.full(len(truth), majority), labels)
            rows.append({"model": f"majority class ({majority})", **metrics})
        wrong = preds[preds["tuned_prediction"] != preds["reference"]].copy()
        wrong.insert(0, "text", [_short(fmt.prompt_text(r)) for r in test.loc[wrong.index].to_dict("records")])
        errors = wrong.sort_values("tuned_confidence", ascending=False).head(cfg.worst_errors)
    else:
        from .tokenization import tokenize_frame
        ds, _ = tokenize_frame(test, fmt)
        for name, ctx in [("tuned", None)] + ([("base", _base)] if cfg.baselines else []):
            def losses(ctx=ctx, name=name):
                progress(f"evaluating the {name} model on {len(ds)} test rows")
                with (ctx(model) if ctx else contextlib.nullcontext()):
                    return completion_loss(model, ds, collator, batch_size, precision)
            loss, per_row = losses() if name == "tuned" else _base_once(
                base_memo, ("test loss", cfg.max_test_rows), losses, progress, "test loss")
            rows.append({"model": name, "loss": loss, "perplexity": float(np.exp(loss))})
            if name == "tuned" and len(per_row) == len(test):
                preds["tuned_loss"] = per_row
        errors = preds.assign(prompt=[_short(fmt.prompt_text(r)) if "messages" not in r else "(chat)"
                                      for r in test.to_dict("records")])
        errors = errors.sort_values("tuned_loss", ascending=False).head(cfg.worst_errors) \
            if "tuned_loss" in errors else errors.head(0)
    samples = _samples(model, fmt, test, cfg, precision, progress, base_memo) if objective != "head" else \
        pd.DataFrame(columns=["prompt", "reference", "base", "tuned"])
    return EvalResult(pd.DataFrame(rows).set_index("model"), confusion, errors.reset_index(drop=True),
                      samples, preds)


def _samples(model, fmt, test, cfg: EvalConfig, precision, progress, base_memo: dict | None = None
             ) -> pd.DataFrame:
    if not cfg.num_samples or "messages" in test:
        return pd.DataFrame(columns=["prompt", "reference", "base", "tuned"])
    chosen = test.head(cfg.num_samples)
    progress(f"generating {len(chosen)} samples from the base and the tuned model")
    tuned = generate(model, fmt, chosen, cfg.max_new_tokens, precision)

    def from_base():
        with _base(model):
            return generate(model, fmt, chosen, cfg.max_new_tokens, precision)
    base = _base_once(base_memo, ("samples", cfg.max_test_rows, cfg.num_samples, cfg.max_new_tokens), from_base,
                      progress, "samples")
    reference = chosen["label"] if "label" in chosen else chosen["completion"]
    return pd.DataFrame({"prompt": [_short(fmt.prompt_text(r), 120) for r in chosen.to_dict("records")],
                         "reference": reference.values, "base": base, "tuned": tuned})


def compare_prompt(model, fmt: Formatter, text: str, task: str, max_new_tokens: int = 40,
                   precision: str = "float32") -> dict:
    """Base and tuned generations for a prompt the user typed, formatted as training rows were
    (a classification text gets the same instruction the model was trained with)."""
    row = {"text": text, "label": ""} if task == "classification" else {"prompt": text, "completion": ""}
    frame = pd.DataFrame([row])
    tuned = generate(model, fmt, frame, max_new_tokens, precision)[0]
    with _base(model):
        base = generate(model, fmt, frame, max_new_tokens, precision)[0]
    return {"prompt": text, "base": base, "tuned": tuned}
