"""Loading: a table from a built-in name, a file, a DataFrame, a `datasets.Dataset` or a Hub id."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .. import assets
from ..config import DataConfig
from ..errors import UserError

_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}


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
        return builtin_rows(text, _read_file(assets.data_path(text), cfg))
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path, cfg)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a data file inside it (.csv .tsv .json .jsonl .parquet)")
    if path.suffix.lower() in _SUFFIX_FORMAT or "\\" in text or text.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {path} (check the path; built-in data sets: "
                        + ", ".join(n for n, a in assets.BUILTIN.items() if a.kind == "data") + ")")
    return _read_hub(text)


def builtin_rows(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a shared file that make up the built-in data set `name`."""
    for column, value in assets.get(name).rows_where.items():
        frame = frame[frame[column] == value]
    return frame.reset_index(drop=True)


def _read_hub(name: str) -> pd.DataFrame:
    try:
        import datasets  # optional: only Hub data sets need it
    except ImportError:
        raise UserError(f"{name!r} is not a built-in data set or a file; to load it from the Hugging Face "
                        "Hub install `datasets`") from None
    from ..hardware import hub_reachable
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
    fmt = _format_of(path, cfg)
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; give a file with a header and at least two rows")
    _check_fits_in_memory(path)
    skipped: list[int] = []
    df = _parse(path, fmt, cfg, skipped)
    if len(df) == 0:
        raise UserError(f"{path} has no data rows; give a file with at least two rows")
    df.attrs["skipped_lines"] = len(skipped)
    return df


def _format_of(path: Path, cfg: DataConfig) -> str:
    """data.format, or the one the file's suffix names."""
    fmt = cfg.format if cfg.format != "auto" else _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path.name}; set data.format to one of "
                        "csv, tsv, json, jsonl, parquet")
    return fmt


def _parse(path: Path, fmt: str, cfg: DataConfig, skipped: list) -> pd.DataFrame:
    """The file read as `fmt`, unreadable lines counted into `skipped`; a parser's error as one
    line that names the file."""
    try:
        if fmt in ("csv", "tsv"):
            return _read_delimited(path, fmt, cfg, skipped)
        if fmt == "jsonl":
            return _read_jsonl(path, cfg.skip_bad_lines, skipped)
        if fmt == "json":
            return _read_json(path)
        return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path.name} is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise UserError(f"cannot read {path.name} as {fmt}: {str(err).splitlines()[0]}") from None


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
