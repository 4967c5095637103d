"""Column mapping: the user's columns to each task's standard ones.

  classification: text, label            (label is the word the model learns, a string)
  completion:     prompt, completion     or  messages (a list of {role, content})
  preference:     prompt, chosen, rejected   or  messages (the chat before the answers), chosen, rejected
"""
from __future__ import annotations

import hashlib
import json
import string

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import UserError


def frame_digest(frame: pd.DataFrame) -> str:
    """A digest of a frame's column names, index and values: the same for the same rows."""
    digest = hashlib.sha256(json.dumps(list(map(str, frame.columns))).encode())
    try:
        digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    except TypeError:  # unhashable cells (a chat's list of messages, or an array of them from Parquet)
        digest.update(json.dumps(frame.to_dict(orient="split"), default=_plain).encode())
    return digest.hexdigest()


def _plain(value):
    """A cell JSON cannot hold, as it can: arrays whole (str() cuts long ones), anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


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
    if cfg.task == "preference":
        return _normalize_pairs(df, cfg)
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
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _normalize_completion(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    messages_col = cfg.messages_column or ("messages" if "messages" in df.columns else "")
    if messages_col:
        return _normalize_messages(_need_column(df, messages_col, "data.messages_column"), messages_col)
    if not cfg.prompt_column and {"instruction", "output"} <= set(df.columns):
        return _normalize_alpaca(df)
    if cfg.text_template:  # the prompt built from several columns
        prompt = _as_text(_fill_template(df, cfg.text_template))
    else:
        prompt = _as_text(_need_column(df, cfg.prompt_column or "prompt", "data.prompt_column"))
    completion = _as_text(_need_column(df, cfg.completion_column or "completion", "data.completion_column"))
    return pd.DataFrame({"prompt": prompt.values, "completion": completion.values})


def _normalize_messages(msgs: pd.Series, column: str, need_assistant: bool = True) -> pd.DataFrame:
    """Chats as lists of {role, content} dicts, each with an assistant turn to train on (a
    preference prompt needs none: its answers are apart)."""
    for i, m in enumerate(msgs):
        if not isinstance(m, (list, np.ndarray)) or not all(isinstance(t, dict) and "role" in t
                                                             and "content" in t for t in m):
            raise UserError(f"row {i} of {column!r} is not a list of {{role, content}} messages")
        if need_assistant and not any(t["role"] == "assistant" for t in m):
            raise UserError(f"row {i} of {column!r} has no assistant turn to train on")
    return pd.DataFrame({"messages": [[dict(t) for t in m] for m in msgs]})


def _normalize_pairs(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Preference rows: a prompt (text, or the chat before the answers) and two answers as text.
    Chat answers (TRL's conversational layout) are lists of messages whose last turn is the
    answer; without a prompt column the turns before it are the prompt, the same on both sides."""
    chosen = _need_column(df, cfg.chosen_column or "chosen", "data.chosen_column")
    rejected = _need_column(df, cfg.rejected_column or "rejected", "data.rejected_column")
    prompt_col = cfg.prompt_column or ("prompt" if "prompt" in df.columns else "")
    messages_col = cfg.messages_column or ("messages" if "messages" in df.columns else "")
    out = pd.DataFrame({"chosen": chosen.map(_last_answer).values, "rejected": rejected.map(_last_answer).values})
    if messages_col or (prompt_col in df.columns and _is_chat(df[prompt_col])):
        column = messages_col or prompt_col
        _normalize_messages(_need_column(df, column, "data.messages_column"), column, need_assistant=False)
        out.insert(0, "messages", [[dict(t) for t in m] for m in df[column]])
    elif cfg.text_template or prompt_col:
        out.insert(0, "prompt", _as_text(_fill_template(df, cfg.text_template) if cfg.text_template
                                         else _need_column(df, prompt_col, "data.prompt_column")).values)
    elif _is_chat(chosen):
        out.insert(0, "messages", _shared_turns(chosen, rejected))
    else:
        _need_column(df, "prompt", "data.prompt_column")
    return out


def _is_chat(values: pd.Series) -> bool:
    return any(isinstance(v, (list, np.ndarray)) for v in values)


def _last_answer(value) -> str:
    """An answer as text: the value itself, or the content of a chat's last turn."""
    if isinstance(value, (list, np.ndarray)):
        return str(value[-1].get("content", "")) if len(value) and isinstance(value[-1], dict) else ""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _shared_turns(chosen: pd.Series, rejected: pd.Series) -> list[list[dict]]:
    """The turns before each pair's answers, which both sides must share."""
    prompts = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        before = [dict(t) for t in (c[:-1] if isinstance(c, (list, np.ndarray)) else [])]
        if isinstance(r, (list, np.ndarray)) and [dict(t) for t in r[:-1]] != before:
            raise UserError(f"row {i}: the chosen and rejected chats differ before their last turn; give the "
                            "shared turns in a prompt column (data.prompt_column) and the answers apart")
        prompts.append(before)
    return prompts


def _normalize_alpaca(df: pd.DataFrame) -> pd.DataFrame:
    """Alpaca's instruction / input / output: the input, where there is one, after the instruction."""
    instruction, output = _as_text(df["instruction"]), _as_text(df["output"])
    extra = _as_text(df["input"]) if "input" in df.columns else pd.Series([""] * len(df), index=df.index)
    prompt = [i if not x.strip() else f"{i}\n\n{x}" for i, x in zip(instruction, extra)]
    return pd.DataFrame({"prompt": prompt, "completion": output.values})


def key_text(frame: pd.DataFrame) -> pd.Series:
    """The text that identifies a row (for duplicates and leakage); a preference row is its
    prompt and both answers."""
    if "chosen" in frame:
        return prompt_key(frame) + "\x00" + frame["chosen"] + "\x00" + frame["rejected"]
    if "text" in frame:
        return frame["text"]
    if "prompt" in frame:
        return frame["prompt"]
    return frame["messages"].map(lambda m: json.dumps(m, sort_keys=True))


def prompt_key(frame: pd.DataFrame) -> pd.Series:
    """Each row's prompt as text: the prompt column, or the chat's messages as JSON."""
    if "prompt" in frame:
        return frame["prompt"]
    return frame["messages"].map(lambda m: json.dumps(m, sort_keys=True))


def duplicated(frame: pd.DataFrame) -> pd.Series:
    """Rows equal to an earlier row in every standard column."""
    return key_text(frame).duplicated() if "messages" in frame else frame.duplicated()
