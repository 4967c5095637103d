"""Writes docs/config.md, the reference of every setting, from the config dataclasses' help text.

    python docs/config_reference.py
"""
import dataclasses
import json
from pathlib import Path

from nb_finetune.config import SECTIONS, type_name


def reference() -> str:
    """Every setting as Markdown, from the dataclasses' help text (a test checks that
    docs/config.md is current)."""
    lines = ["# Configuration reference", "",
             "Generated from the help text in `nb_finetune/config.py` by `python docs/config_reference.py`. "
             "A run config is YAML or JSON with the sections below; every setting is optional. "
             "`on`/`off` and `yes`/`no` may be written bare: YAML reads them as true/false, and a "
             "setting offering those words takes them back.", ""]
    for section, klass in SECTIONS.items():
        lines += [f"## `{section}`", "", "| setting | default | accepted | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(klass):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"| `{f.name}` | `{json.dumps(default)}` | {accepted(f)} | "
                         f"{f.metadata['help'].replace('|', '&#124;')} |")
        lines.append("")
    return "\n".join(lines)


def accepted(f: dataclasses.Field) -> str:
    meta = f.metadata
    if "choices" in meta:
        return ", ".join(f"`{c}`" for c in meta["choices"])
    if "items" in meta:
        return "list of " + ", ".join(f"`{c}`" for c in meta["items"])
    lo, hi = meta.get("min"), meta.get("max")
    bounds = f" from {lo}" if lo is not None else ""
    bounds += f" to {hi}" if hi is not None else ""
    return type_name(f) + bounds


if __name__ == "__main__":
    out = Path(__file__).with_name("config.md")
    out.write_text(reference() + "\n", encoding="utf-8")
    print(f"wrote {out}")
