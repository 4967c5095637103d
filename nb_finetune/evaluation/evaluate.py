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

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import kernels
from ..config import EvalConfig
from ..data.collator import CompletionOnlyCollator
from ..data.formatter import Formatter
from ..data.tokens import TokenizedDataset, tokenize_frame
from ..render.tables import shorten
from .base_cache import BaseResults, as_base
from .scoring import classification_metrics, completion_loss, generate, head_scores, score_labels


@dataclass
class EvalResult:
    metrics: pd.DataFrame                 # one row per model: tuned, base, majority
    confusion: pd.DataFrame | None        # tuned model, rows = true label, columns = predicted
    errors: pd.DataFrame                  # worst errors of the tuned model
    samples: pd.DataFrame                 # prompt, reference, base, tuned
    predictions: pd.DataFrame             # one row per test row
    instruction: str = ""                 # before every text in errors and samples (shown once, not per row)

    def summary(self) -> str:
        return self.metrics.to_string(float_format=lambda v: f"{v:.3f}")

    def _repr_html_(self) -> str:
        from ..render import html
        return html.evaluation(self)

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


@dataclass
class EvalTarget:
    """The model under test and how it is run: what every evaluation step shares. `base_key`
    names the base, its settings and the test rows; the base's results are kept under it in
    `base_results`, plus what each result depends on."""
    model: object
    fmt: Formatter
    batch_size: int = 8
    precision: str = "float32"
    progress: object = print
    base_results: BaseResults = field(default_factory=BaseResults)
    base_key: tuple = ()
    kernels_on: bool = False


def evaluate(target: EvalTarget, prep, objective: str, cfg: EvalConfig) -> EvalResult:
    """The tuned model, and with cfg.baselines the base model (adapter off) and the majority
    class, on the test split."""
    with kernels.for_inference(target.kernels_on):
        return Run(target, prep, objective, cfg).evaluate()


@dataclass
class Run:
    """One evaluation's inputs, shared by its steps."""
    t: EvalTarget
    prep: object
    objective: str
    cfg: EvalConfig

    def evaluate(self) -> EvalResult:
        test = self.prep.splits["test"]
        if self.cfg.max_test_rows and len(test) > self.cfg.max_test_rows:
            test = test.sample(n=self.cfg.max_test_rows, random_state=0).reset_index(drop=True)
        self.test = test
        self.collator = CompletionOnlyCollator(self.t.fmt.tokenizer.pad_token_id)
        self.t.model.eval()
        self.preds = pd.DataFrame({"reference": test["label"] if "label" in test else
                                   test.get("completion", pd.Series([""] * len(test)))})
        labels = label_candidates(self.prep)
        rows, confusion, errors = self.label_metrics(labels) if labels else self.completion_metrics()
        samples = self.samples() if self.objective != "head" else \
            pd.DataFrame(columns=["prompt", "reference", "base", "tuned"])
        # A classification head reads the text alone: no instruction to show.
        instruction = self.t.fmt.instruction if "text" in test and self.objective != "head" else ""
        return EvalResult(pd.DataFrame(rows).set_index("model"), confusion, errors.reset_index(drop=True),
                          samples, self.preds, instruction)

    def shown(self, row: dict, n: int = 160) -> str:
        """A test row's prompt as the tables show it: a text without the instruction every
        text shares (the result holds it once), shortened."""
        if "messages" in row:
            return "(chat)"
        return shorten(row["text"] if "text" in row else self.t.fmt.prompt_text(row), n)

    def tuned_and_base(self, compute, with_base: bool, key: tuple, what: str) -> list:
        """[(name, compute(name))] for the tuned model and, with_base, the base (kept)."""
        out = [("tuned", compute("tuned"))]
        if with_base:
            out.append(("base", self.t.base_results.on_base(self.t.model, self.t.base_key + key, lambda: compute("base"),
                                                          self.t.progress, what)))
        return out

    def label_scores(self, name: str, labels: list[str]):
        self.t.progress(f"evaluating the {name} model on {len(self.test)} test rows")
        if self.objective == "head":
            ids = {lab: i for i, lab in enumerate(labels)}
            ds = TokenizedDataset(self.t.fmt.encode_classification_many(self.test.to_dict("records"), ids))
            return head_scores(self.t.model, ds, self.collator, self.t.batch_size, self.t.precision)
        return score_labels(self.t.model, self.t.fmt, self.test, labels, self.collator, self.t.batch_size, self.t.precision)

    def label_metrics(self, labels: list[str]):
        """Accuracy and macro-F1 of each model and the majority class; the tuned model's
        confusion matrix and its most confident errors."""
        truth, rows, confusion = self.preds["reference"].to_numpy(), [], None
        with_base = self.cfg.baselines and self.objective != "head"
        for name, scores in self.tuned_and_base(lambda name: self.label_scores(name, labels), with_base,
                                                ("label scores", self.cfg.max_test_rows), "test scores"):
            picked = np.asarray(labels)[scores.argmax(1)]
            metrics, conf = classification_metrics(truth, picked, labels)
            rows.append({"model": name, **metrics})
            self.preds[f"{name}_prediction"] = picked
            if name == "tuned":
                confusion = conf
                probs = np.exp(scores - scores.max(1, keepdims=True))
                self.preds["tuned_confidence"] = (probs / probs.sum(1, keepdims=True)).max(1)
        if self.cfg.baselines:
            column = "label" if "label" in self.test else "completion"
            majority = self.prep.splits["train"][column].value_counts().index[0]
            metrics, _ = classification_metrics(truth, np.full(len(truth), majority), labels)
            rows.append({"model": f"majority class ({majority})", **metrics})
        wrong = self.preds[self.preds["tuned_prediction"] != self.preds["reference"]].copy()
        wrong.insert(0, "text", [self.shown(r) for r in self.test.loc[wrong.index].to_dict("records")])
        return rows, confusion, wrong.sort_values("tuned_confidence", ascending=False).head(self.cfg.worst_errors)

    def completion_metrics(self):
        """Loss and perplexity on completion tokens; the rows the tuned model found hardest."""
        ds, _ = tokenize_frame(self.test, self.t.fmt)

        def losses(name):
            self.t.progress(f"evaluating the {name} model on {len(ds)} test rows")
            return completion_loss(self.t.model, ds, self.collator, self.t.batch_size, self.t.precision)

        rows = []
        for name, (loss, per_row) in self.tuned_and_base(losses, self.cfg.baselines,
                                                         ("test loss", self.cfg.max_test_rows), "test loss"):
            rows.append({"model": name, "loss": loss, "perplexity": float(np.exp(loss))})
            if name == "tuned" and len(per_row) == len(self.test):
                self.preds["tuned_loss"] = per_row
        errors = self.preds.assign(prompt=[self.shown(r) for r in self.test.to_dict("records")])
        errors = errors.sort_values("tuned_loss", ascending=False).head(self.cfg.worst_errors) \
            if "tuned_loss" in errors else errors.head(0)
        return rows, None, errors

    def samples(self) -> pd.DataFrame:
        cfg, test = self.cfg, self.test
        if not cfg.num_samples or "messages" in test:
            return pd.DataFrame(columns=["prompt", "reference", "base", "tuned"])
        chosen = test.head(cfg.num_samples)
        self.t.progress(f"generating {len(chosen)} samples from the base and the tuned model")
        outputs = dict(self.tuned_and_base(
            lambda name: generate(self.t.model, self.t.fmt, chosen, cfg.max_new_tokens, self.t.precision), True,
            ("samples", cfg.max_test_rows, cfg.num_samples, cfg.max_new_tokens), "samples"))
        reference = chosen["label"] if "label" in chosen else chosen["completion"]
        return pd.DataFrame({"prompt": [self.shown(r, 120) for r in chosen.to_dict("records")],
                             "reference": reference.values, "base": outputs["base"], "tuned": outputs["tuned"]})


def compare_prompt(model, fmt: Formatter, text: str, task: str, max_new_tokens: int = 40,
                   precision: str = "float32") -> dict:
    """Base and tuned generations for a prompt the user typed, formatted as training rows were
    (a classification text gets the same instruction the model was trained with)."""
    row = {"text": text, "label": ""} if task == "classification" else {"prompt": text, "completion": ""}
    frame = pd.DataFrame([row])
    tuned = generate(model, fmt, frame, max_new_tokens, precision)[0]
    with as_base(model):
        base = generate(model, fmt, frame, max_new_tokens, precision)[0]
    return {"prompt": text, "base": base, "tuned": tuned}
