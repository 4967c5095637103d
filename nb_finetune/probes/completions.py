"""Completion probes: prompts with a group slot ("The {group} worked as a") or BOLD prompts;
several seeded samples per prompt, each scored by a pluggable scorer. Reported per group with
confidence intervals, the gap between groups, and the completion pairs that differ most."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import UserError
from .likelihood import bootstrap_ci


def template_prompts(templates: list[str], groups: list[str]) -> pd.DataFrame:
    """Every template filled with every group: columns group, template, prompt."""
    if not groups:
        raise UserError("the group list is empty; give two or more groups to compare, e.g. ['women', 'men']")
    bad = [t for t in templates if "{group}" not in t]
    if not templates or bad:
        raise UserError(f"template {bad[0]!r} has no {{group}} slot; write it like 'The {{group}} worked as a'"
                        if bad else "no templates given")
    return pd.DataFrame([{"group": g, "template": t, "prompt": t.replace("{group}", g)}
                         for t in templates for g in groups])


def bold_prompts(path: str | Path, groups: list[str] | None = None, per_group: int = 10, seed: int = 0
                 ) -> pd.DataFrame:
    """BOLD prompts ({group: {name: [prompts]}}), `per_group` sampled per group with the seed."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    groups = groups or list(data)
    unknown = [g for g in groups if g not in data]
    if unknown:
        raise UserError(f"{path}: no group(s) {', '.join(unknown)}; it has {', '.join(data)}")
    rows = [{"group": g, "template": name, "prompt": p} for g in groups for name, ps in data[g].items() for p in ps]
    shuffled = pd.DataFrame(rows).sample(frac=1.0, random_state=seed)
    return shuffled.groupby("group", sort=False).head(per_group).reset_index(drop=True)


@dataclass
class Draws:
    """How completions are drawn: how many per prompt, how long at most, how hot, from which
    seed, in batches of how many prompts."""
    samples: int = 3
    max_new_tokens: int = 20
    temperature: float = 0.8
    seed: int = 0
    batch_size: int = 8


@torch.inference_mode()
def sample_completions(model, tokenizer, prompts: list[str], draws: Draws = Draws(), progress=print,
                       word_filter=None) -> list[list[str]]:
    """`draws.samples` completions per prompt, reproducible for a seed (left-padded batches);
    `word_filter` (a `probes.filter.WordFilter`) blocks words as they are generated."""
    from transformers import LogitsProcessorList
    processors = LogitsProcessorList([word_filter] if word_filter is not None else [])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        d = draws
        for start in range(0, len(prompts), d.batch_size):
            torch.manual_seed(d.seed + start)
            chunk = prompts[start:start + d.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, do_sample=True, temperature=d.temperature, top_p=0.95,
                                 max_new_tokens=d.max_new_tokens, num_return_sequences=d.samples, pad_token_id=pad,
                                 logits_processor=processors)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i * d.samples:(i + 1) * d.samples] for i in range(len(chunk))]
            progress(f"generated for {min(start + d.batch_size, len(prompts)):,}/{len(prompts):,} prompts")
    finally:
        tokenizer.padding_side = side
    return out


@dataclass
class CompletionResult:
    scorer: str
    completions: pd.DataFrame   # group, template, prompt, sample, completion, score
    by_group: pd.DataFrame      # mean score with bootstrap interval per group
    gap: dict                   # largest difference between group means, with interval
    divergent: pd.DataFrame = field(default_factory=pd.DataFrame)  # same template, groups far apart

    def _repr_html_(self) -> str:
        from ..render.tables import table_html
        return (f"<b>completion probe: {self.scorer}</b>" + table_html(self.by_group, index=True)
                + f"<div>gap {self.gap['gap']:.3f} [{self.gap['low']:.3f}, {self.gap['high']:.3f}] "
                  f"between {self.gap['high_group']} and {self.gap['low_group']}</div>"
                + table_html(self.divergent.head(5)))

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(f"completion probe: {self.scorer}\n{self.by_group.to_string(float_format=lambda v: f'{v:.3f}')}\n"
               f"gap {self.gap['gap']:.3f} [{self.gap['low']:.3f}, {self.gap['high']:.3f}] between "
               f"{self.gap['high_group']} and {self.gap['low_group']}")


def probe_completions(model, tokenizer, prompts: pd.DataFrame, scorer, draws: Draws = Draws(), progress=print,
                      word_filter=None) -> CompletionResult:
    texts = sample_completions(model, tokenizer, list(prompts["prompt"]), draws, progress, word_filter)
    seed = draws.seed
    rows = [{**r, "sample": k, "completion": c} for r, cs in zip(prompts.to_dict("records"), texts)
            for k, c in enumerate(cs)]
    frame = pd.DataFrame(rows)
    frame["score"] = scorer(list(frame["completion"]))
    by_group = {}
    for g, part in frame.groupby("group", sort=False):
        low, high = bootstrap_ci(part["score"], seed=seed)
        by_group[g] = {"completions": len(part), "mean": part["score"].mean(), "low": low, "high": high}
    by_group = pd.DataFrame.from_dict(by_group, orient="index").rename_axis("group")
    top, bottom = by_group["mean"].idxmax(), by_group["mean"].idxmin()
    a, b = frame.loc[frame["group"] == top, "score"].to_numpy(), frame.loc[frame["group"] == bottom, "score"].to_numpy()
    rng = np.random.default_rng(seed)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(1000)]
    gap = {"gap": float(a.mean() - b.mean()), "low": float(np.percentile(boots, 2.5)),
           "high": float(np.percentile(boots, 97.5)), "high_group": top, "low_group": bottom}
    return CompletionResult(getattr(scorer, "name", "score"), frame, by_group, gap, divergent(frame))


def divergent(frame: pd.DataFrame) -> pd.DataFrame:
    """For each template, the two groups whose mean scores differ most, with one completion each."""
    rows = []
    for template, part in frame.groupby("template"):
        means = part.groupby("group")["score"].mean()
        if len(means) < 2:
            continue
        hi, lo = means.idxmax(), means.idxmin()
        ranked = {g: part[part["group"] == g].sort_values("score") for g in (hi, lo)}
        rows.append({"template": template, "difference": means[hi] - means[lo], "group_a": hi,
                     "completion_a": ranked[hi].iloc[-1]["completion"], "group_b": lo,
                     "completion_b": ranked[lo].iloc[-1 if lo == hi else 0]["completion"]})
    return pd.DataFrame(rows).sort_values("difference", ascending=False).reset_index(drop=True) if rows \
        else pd.DataFrame(rows)
