"""Data: load a table from anywhere, map its columns to a task, check it, split it.

The result of this stage is plain pandas: a normalised frame per split with the columns
  classification: text, label            (label is the word the model learns, a string)
  completion:     prompt, completion     or  messages (a list of {role, content})
and a `DataReport` of everything worth knowing before training.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import assets
from .config import DataConfig
from .errors import UserError


def frame_digest(frame: pd.DataFrame) -> str:
    """A digest of a frame's column names, index and values: the same for the same rows."""
    digest = hashlib.sha256(json.dumps(list(map(str, frame.columns))).encode())
    try:
        digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    except TypeError:  # unhashable cells (a chat's list of messages, or an array of them from Parquet)
        plain = lambda o: o.tolist() if hasattr(o, "tolist") else str(o)  # arrays whole: str() cuts long ones
        digest.update(json.dumps(frame.to_dict(orient="split"), default=plain).encode())
    return digest.hexdigest()


_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}


# -- loading -----------------------------------------------------------------------------

def resolve_source(cfg: DataConfig) -> DataConfig:
    """Fill the config's empty column fields from a built-in data set's defaults."""
    if cfg.source in assets.BUILTIN:
        defaults = assets.get(cfg.source).data_defaults
        blank = DataConfig()
        changes = {k: v for k, v in defaults.items()
                   if getattr(cfg, k) in ("", {}, []) or (k == "task" and cfg.task == blank.task)}
        return replace(cfg, **changes)
    return cfg


def read_table(source, cfg: DataConfig | None = None) -> pd.DataFrame:
    """A DataFrame from a built-in name, a file, a DataFrame, a `datasets.Dataset` or a Hub id."""
    cfg = cfg or DataConfig()
    if isinstance(source, pd.DataFrame):
        return source.copy()
    if hasattr(source, "to_pandas") and type(source).__module__.startswith("datasets"):
        return source.to_pandas()
    if not isinstance(source, (str, Path)):
        raise UserError(f"cannot read data from a {type(source).__name__}; give a file path, "
                        "a built-in name, a pandas DataFrame or a datasets.Dataset")
    text = str(source)
    if text in assets.BUILTIN:
        return _read_file(assets.data_path(text), cfg)
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path, cfg)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a data file inside it (.csv .tsv .json .jsonl .parquet)")
    if path.suffix.lower() in _SUFFIX_FORMAT or "\\" in text or text.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {path} (check the path; built-in data sets: "
                        + ", ".join(n for n, a in assets.BUILTIN.items() if a.kind == "data") + ")")
    return _read_hub(text)


def _read_hub(name: str) -> pd.DataFrame:
    try:
        import datasets  # optional: only Hub data sets need it
    except ImportError:
        raise UserError(f"{name!r} is not a built-in data set or a file; to load it from the Hugging Face "
                        "Hub install `datasets`") from None
    from .hardware import hub_reachable
    try:
        if not hub_reachable():
            raise ConnectionError("the Hub does not answer")
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # the Hub client raises many kinds; all mean "not reachable here"
        raise UserError(f"data set {name!r} is not a built-in name, a file, nor reachable on the Hugging "
                        f"Face Hub ({type(err).__name__}); check the name or give a local file") from None
    return ds.to_pandas()


# pandas holds text at several times its size on disk (Python string objects, indexes).
MEMORY_PER_FILE_BYTE = 6


def _check_fits_in_memory(path: Path) -> None:
    import psutil
    need = path.stat().st_size * MEMORY_PER_FILE_BYTE
    free = psutil.virtual_memory().available
    if need > free:
        raise UserError(f"{path.name} is {path.stat().st_size / 2**30:.1f} GiB; loading it would take about "
                        f"{need / 2**30:.0f} GiB of memory and {free / 2**30:.0f} GiB are free: train on a sample "
                        "of it (e.g. the first rows saved to a new file) or on a machine with more memory")


def _sniff_delimiter(path: Path) -> str:
    """',' unless the start of the file says ';', tab or '|' (as spreadsheets in many locales write)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        sample = fh.read(65536)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _read_file(path: Path, cfg: DataConfig) -> pd.DataFrame:
    fmt = cfg.format if cfg.format != "auto" else _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path.name}; set data.format to one of "
                        "csv, tsv, json, jsonl, parquet")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; give a file with a header and at least two rows")
    _check_fits_in_memory(path)
    skipped: list[int] = []
    try:
        if fmt in ("csv", "tsv"):
            df = _read_delimited(path, fmt, cfg, skipped)
        elif fmt == "jsonl":
            df = _read_jsonl(path, cfg.skip_bad_lines, skipped)
        elif fmt == "json":
            df = _read_json(path)
        else:
            df = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path.name} is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise UserError(f"cannot read {path.name} as {fmt}: {str(err).splitlines()[0]}") from None
    if len(df) == 0:
        raise UserError(f"{path} has no data rows; give a file with at least two rows")
    df.attrs["skipped_lines"] = len(skipped)
    return df


def _read_delimited(path: Path, fmt: str, cfg: DataConfig, skipped: list) -> pd.DataFrame:
    sep = _sniff_delimiter(path) if fmt == "csv" else "\t"
    header = None if cfg.column_names else "infer"

    def bad_line(fields):  # a row with more fields than the header
        if not cfg.skip_bad_lines:
            raise UserError(f"{path.name}: a row has {len(fields)} fields where the header has fewer "
                            f"(it starts {sep.join(fields)[:60]!r}); fix it, or set data.skip_bad_lines: true "
                            "to skip such rows (their count is reported)")
        skipped.append(fields)
        return None

    # utf-8-sig drops a byte-order mark; GLUE-style TSVs carry bare quotes, so no quoting there.
    return pd.read_csv(path, sep=sep, encoding="utf-8-sig", header=header, names=list(cfg.column_names) or None,
                       quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE, dtype=str,
                       keep_default_na=False, engine="python", on_bad_lines=bad_line)


def _read_jsonl(path: Path, skip_bad: bool = False, skipped: list | None = None) -> pd.DataFrame:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if skip_bad:
                    skipped.append(lineno)
                    continue
                raise UserError(f"{path.name} line {lineno} is not valid JSON ({err.msg}); fix or delete that "
                                "line, or set data.skip_bad_lines: true to skip such lines (their count is "
                                "reported)") from None
    return pd.DataFrame(rows)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path.name} is not valid JSON (line {err.lineno}: {err.msg}); "
                        "for one record per line use .jsonl") from None
    if isinstance(raw, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in raw.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path.name} holds an object; give a list of records or an object with one list")
        raw = lists[0]
    if not isinstance(raw, list):
        raise UserError(f"{path.name} must hold a list of records")
    return pd.DataFrame(raw)


# -- column mapping ----------------------------------------------------------------------

def _need_column(df: pd.DataFrame, column: str, setting: str) -> pd.Series:
    if column not in df.columns:
        raise UserError(f"column {column!r} not found; the columns are: {', '.join(map(str, df.columns))} "
                        f"(set {setting})")
    return df[column]


def _as_text(values: pd.Series) -> pd.Series:
    return values.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))


def normalize(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Map the user's columns to the task's standard columns (see module docstring)."""
    if cfg.task == "classification":
        return _normalize_classification(df, cfg)
    return _normalize_completion(df, cfg)


def _fill_template(df: pd.DataFrame, template: str) -> pd.Series:
    missing = [c for c in _template_fields(template) if c not in df.columns]
    if missing:
        raise UserError(f"data.text_template names missing column(s) {', '.join(missing)}; the columns "
                        f"are: {', '.join(map(str, df.columns))}")
    return df.apply(lambda r: template.format(**{k: r[k] for k in df.columns}), axis=1)


def _normalize_classification(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    if cfg.text_template:
        text = _fill_template(df, cfg.text_template)
    else:
        col = cfg.text_column or next((c for c in ("text", "sentence", "review") if c in df.columns), "text")
        text = _as_text(_need_column(df, col, "data.text_column"))
    raw = _as_text(_need_column(df, cfg.label_column or "label", "data.label_column"))
    unknown = sorted(set(raw) - set(cfg.label_names)) if cfg.label_names else []
    if unknown:
        raise UserError(f"labels {unknown[:5]} have no word in data.label_names "
                        f"({cfg.label_names}); add them or clear label_names")
    label = raw.map(cfg.label_names) if cfg.label_names else raw
    return pd.DataFrame({"text": _as_text(text).values, "label": label.values})


def _template_fields(template: str) -> list[str]:
    import string
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _normalize_completion(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    messages_col = cfg.messages_column or ("messages" if "messages" in df.columns else "")
    if messages_col:
        msgs = _need_column(df, messages_col, "data.messages_column")
        for i, m in enumerate(msgs):
            if not isinstance(m, (list, np.ndarray)) or not all(isinstance(t, dict) and "role" in t
                                                                 and "content" in t for t in m):
                raise UserError(f"row {i} of {messages_col!r} is not a list of {{role, content}} messages")
            if not any(t["role"] == "assistant" for t in m):
                raise UserError(f"row {i} of {messages_col!r} has no assistant turn to train on")
        return pd.DataFrame({"messages": [[dict(t) for t in m] for m in msgs]})
    if not cfg.prompt_column and {"instruction", "output"} <= set(df.columns):
        instruction, output = _as_text(df["instruction"]), _as_text(df["output"])
        extra = _as_text(df["input"]) if "input" in df.columns else pd.Series([""] * len(df), index=df.index)
        prompt = [i if not x.strip() else f"{i}\n\n{x}" for i, x in zip(instruction, extra)]
        return pd.DataFrame({"prompt": prompt, "completion": output.values})
    if cfg.text_template:  # the prompt built from several columns
        prompt = _as_text(_fill_template(df, cfg.text_template))
    else:
        prompt = _as_text(_need_column(df, cfg.prompt_column or "prompt", "data.prompt_column"))
    completion = _as_text(_need_column(df, cfg.completion_column or "completion", "data.completion_column"))
    return pd.DataFrame({"prompt": prompt.values, "completion": completion.values})


def key_text(frame: pd.DataFrame) -> pd.Series:
    """The text that identifies a row (for duplicates and leakage)."""
    if "text" in frame:
        return frame["text"]
    if "prompt" in frame:
        return frame["prompt"]
    return frame["messages"].map(lambda m: json.dumps(m, sort_keys=True))


def _duplicated(frame: pd.DataFrame) -> pd.Series:
    """Rows equal to an earlier row in every standard column."""
    return key_text(frame).duplicated() if "messages" in frame else frame.duplicated()


# -- report ------------------------------------------------------------------------------

@dataclass
class DataReport:
    """What was found in the data. `checks` has one row per check with a severity."""
    checks: pd.DataFrame
    class_balance: pd.Series | None = None
    token_lengths: pd.Series | None = None
    max_length: int | None = None  # the train.max_length the token lengths were cut to
    split_sizes: dict = field(default_factory=dict)

    def add(self, check: str, count: int, total: int, severity: str, detail: str) -> None:
        row = {"check": check, "count": int(count), "share": (count / total) if total else 0.0,
               "severity": severity, "detail": detail}
        self.checks = pd.concat([self.checks, pd.DataFrame([row])], ignore_index=True)

    @property
    def warnings(self) -> pd.DataFrame:
        return self.checks[self.checks["severity"] != "ok"]

    def summary(self) -> str:
        lines = []
        for r in self.checks.itertuples():
            mark = {"ok": " ", "warning": "!", "error": "x"}[r.severity]
            lines.append(f" {mark} {r.check}: {r.count:,} ({r.share:.0%}) {r.detail}".rstrip())
        if self.token_lengths is not None and len(self.token_lengths):
            q = self.token_lengths.quantile([0.5, 0.95])
            lines.append(f"   token lengths: median {q[0.5]:.0f}, 95th percentile {q[0.95]:.0f}, "
                         f"max {self.token_lengths.max()}")
        if self.split_sizes:
            lines.append("   split: " + ", ".join(f"{k} {v:,}" for k, v in self.split_sizes.items()))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from .display import report_html
        return report_html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())

    def to_dict(self) -> dict:
        return {"checks": self.checks.to_dict(orient="records"),
                "class_balance": None if self.class_balance is None else self.class_balance.to_dict(),
                "token_lengths": None if self.token_lengths is None else
                self.token_lengths.describe().round(1).to_dict(),
                "split_sizes": self.split_sizes}


def build_report(raw: pd.DataFrame, frame: pd.DataFrame, task: str) -> DataReport:
    """Check a normalised frame; raises UserError for data that cannot be trained on at all."""
    n = len(frame)
    report = DataReport(pd.DataFrame(columns=["check", "count", "share", "severity", "detail"]))
    if n == 0:
        raise UserError("the data set has no rows; give a file with at least two rows")
    names = [str(c) for c in raw.columns]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    report.add("rows", n, n, "ok", f"source columns: {shown}")
    skipped = raw.attrs.get("skipped_lines", 0)
    if skipped:
        report.add("unreadable lines skipped", skipped, n + skipped, "warning", "data.skip_bad_lines is on")
    for col in [c for c in ("text", "prompt", "completion", "label") if c in frame]:
        empty = int((frame[col].str.strip() == "").sum())
        if empty == n:
            raise UserError(f"the {col} column is empty in every row; point data.{col}_column at the "
                            "column that holds it")
        report.add(f"empty {col}", empty, n, "warning" if empty else "ok",
                   "rows dropped" if empty else "")
    dup = int(_duplicated(frame).sum())
    report.add("exact duplicates", dup, n, "warning" if dup else "ok", "")
    if task == "classification":
        per_text = frame.groupby("text")["label"].nunique()
        conflicts = int(per_text[per_text > 1].size)
        report.add("same text, conflicting labels", conflicts, n, "warning" if conflicts else "ok",
                   "texts" if conflicts else "")
        balance = frame["label"].value_counts()
        if balance.size < 2:
            raise UserError(f"the label column has a single class ({balance.index[0]!r}); classification "
                            "needs two or more classes: check data.label_column")
        report.class_balance = balance
        ratio = balance.max() / balance.min()
        report.add("classes", balance.size, balance.size, "warning" if ratio > 3 else "ok",
                   ", ".join(f"{k}: {v}" for k, v in balance.items()))
    return report


# -- cleaning and splitting --------------------------------------------------------------

def clean(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    for col in ("text", "prompt", "completion", "label"):
        if col in frame:
            keep &= frame[col].str.strip() != ""
    frame = frame[keep]
    if cfg.drop_duplicates:
        frame = frame[~_duplicated(frame)]
    return frame.reset_index(drop=True)


def split(frame: pd.DataFrame, cfg: DataConfig, stratify: str | None) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split, stratified by `stratify` when given."""
    rng = np.random.default_rng(cfg.seed)
    fractions = {"validation": cfg.val_fraction, "test": 0.0 if cfg.test_source else cfg.test_fraction}
    groups = frame.groupby(stratify).indices.items() if stratify else [(None, np.arange(len(frame)))]
    parts = {"train": [], "validation": [], "test": []}
    for name, idx in groups:
        idx = rng.permutation(idx)
        need = 1 + sum(1 for f in fractions.values() if f > 0)
        if len(idx) < need:
            raise UserError(f"class {name!r} has only {len(idx)} row(s); a stratified split needs at least "
                            f"{need} (one per split): add rows, merge the class, or set the fractions to 0")
        start = 0
        for split_name, frac in fractions.items():
            k = max(1, round(len(idx) * frac)) if frac > 0 else 0
            parts[split_name].append(idx[start:start + k])
            start += k
        parts["train"].append(idx[start:])
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks)) if chunks else np.array([], dtype=int)
        out[name] = frame.iloc[idx].reset_index(drop=True)
    return out


def _mitigate(train: pd.DataFrame, cfg: DataConfig, report: DataReport) -> pd.DataFrame:
    """Counterfactual augmentation and reweighting of the training split, each reported."""
    from . import mitigation
    text = "text" if "text" in train else "prompt"
    if cfg.counterfactual:
        train, copies = mitigation.counterfactual_augment(train, cfg.counterfactual_terms or mitigation.GENDER_TERMS)
        report.add("counterfactual copies added to train", copies, len(train) - copies, "ok",
                   "group terms swapped" if copies else "no row mentions a term")
    if cfg.reweight_groups:
        groups = mitigation.term_groups(train, cfg.reweight_groups, text)
        named = groups.isin(list(cfg.reweight_groups))
        balanced, effect = mitigation.reweight(train[named], groups[named], cfg.seed)
        train = pd.concat([balanced, train[~named]], ignore_index=True)
        report.add("rows drawn again to balance groups", sum(after - before for before, after in effect.values()),
                   len(train), "ok", ", ".join(f"{g}: {b} -> {a}" for g, (b, a) in effect.items()))
    return train


@dataclass
class PreparedData:
    splits: dict[str, pd.DataFrame]
    report: DataReport
    task: str
    labels: list[str]          # label words (classification), in a fixed order
    config: DataConfig


def prepare(cfg: DataConfig, source=None) -> PreparedData:
    """Load, normalise, check, clean and split. `source` overrides cfg.source (e.g. a DataFrame)."""
    if source is None:  # a built-in name's column defaults apply to that data set only
        cfg = resolve_source(cfg)
    raw = read_table(cfg.source if source is None else source, cfg)
    if cfg.max_rows and len(raw) > cfg.max_rows:
        raw = raw.sample(n=cfg.max_rows, random_state=cfg.seed).sort_index()
    frame = normalize(raw, cfg)
    report = build_report(raw, frame, cfg.task)
    cleaned = clean(frame, cfg)
    dropped = len(frame) - len(cleaned)
    report.add("rows dropped (empty or duplicate)", dropped, len(frame), "warning" if dropped else "ok", "")
    stratify = "label" if cfg.task == "classification" else None
    splits = split(cleaned, cfg, stratify)
    if cfg.test_source:
        test_raw = read_table(cfg.test_source, cfg)
        splits["test"] = clean(normalize(test_raw, cfg), replace(cfg, drop_duplicates=False))
    if len(splits["train"]) == 0:
        raise UserError("no rows left for training after the split; add rows or lower the fractions")
    splits["train"] = _mitigate(splits["train"], cfg, report)
    train_keys = set(key_text(splits["train"]))
    for name in ("validation", "test"):
        if len(splits[name]):
            shared = int(key_text(splits[name]).isin(train_keys).sum())
            report.add(f"leakage: {name} texts also in train", shared, len(splits[name]),
                       "warning" if shared else "ok", "")
    report.split_sizes = {k: len(v) for k, v in splits.items()}
    labels = sorted(cleaned["label"].unique()) if stratify else []
    if labels and cfg.label_names:  # keep the user's order (e.g. negative before positive)
        order = list(dict.fromkeys(cfg.label_names.values()))
        labels = [lab for lab in order if lab in labels] + [lab for lab in labels if lab not in order]
    return PreparedData(splits, report, cfg.task, labels, cfg)
