"""Writes docs/config.md, the reference of every setting, from the config dataclasses' help text.

    python docs/config_reference.py
"""
from pathlib import Path

from nb_finetune.config import reference

if __name__ == "__main__":
    out = Path(__file__).with_name("config.md")
    out.write_text(reference() + "\n", encoding="utf-8")
    print(f"wrote {out}")
