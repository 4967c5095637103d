"""The commands of both front ends in one table: `nb-finetune COMMAND` (cli.py) and
`%finetune COMMAND` (magics.py) read their names and help from here, and a test checks that
each front end offers exactly the commands the table gives it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One command; `cli` and `magic` are its help in each front end, None where it is not offered."""
    name: str
    cli: str | None = None
    magic: str | None = None
    magic_args: str = ""  # what follows the name in `%finetune help`


COMMANDS = (
    Command("demo", cli="SmolLM2-135M-Instruct learns IMDB sentiment, offline, in minutes on a CPU"),
    Command("run", cli="run a saved config (YAML or JSON)"),
    Command("validate", cli="check a config and its data without training"),
    Command("studio", magic="every panel in tabs, over the current settings"),
    Command("data", magic="the data panel (PATH: a file, built-in name or Hub id to load)", magic_args="[PATH]"),
    Command("preview", magic="the tokenization preview"),
    Command("model", magic="the model and hyperparameter panel"),
    Command("train", magic="the training panel (FILE: a YAML/JSON config to use first)",
            magic_args="[--config FILE]"),
    Command("evaluate", magic="the evaluation panel"),
    Command("probe", cli="run the bias probes (probe: settings) on a saved run's base and adapter; exit status 3 "
                         "when the bias gate fails",
            magic="the bias probe panel (in a terminal: N built-in CrowS-Pairs pairs, base vs tuned; gate: the "
                  "config's probe: section checked against its thresholds)", magic_args="[N|gate]"),
    Command("export", cli="write a job folder for torchrun / accelerate (config + launch scripts), or with --gguf "
                          "the tuned model as GGUF for llama.cpp / Ollama",
            magic="the export panel"),
    Command("runs", cli="the runs in a folder: list (the default), show NAME, diff A B, compare A B [C ...]",
            magic="the runs panel over DIR (default: the folder train.output_dir is in; in a terminal: the runs "
                  "table)", magic_args="[DIR]"),
    Command("sweep", cli="train every combination of a few settings, one run after another"),
    Command("config", magic="the current settings"),
    Command("assets", cli="built-in models and data sets", magic="built-in models and data sets, cached or not"),
    Command("env", magic="what the toolkit found here and what it means for you"),
    Command("presets", cli="list shipped presets, or print one"),
)

BY_NAME = {c.name: c for c in COMMANDS}


def for_cli() -> list[Command]:
    return [c for c in COMMANDS if c.cli is not None]


def for_magics() -> list[Command]:
    return [c for c in COMMANDS if c.magic is not None]


def magic_usage() -> str:
    """`%finetune help`: each magic subcommand with its arguments and help."""
    rows = [(f"{c.name} {c.magic_args}".strip(), c.magic) for c in for_magics()]
    width = max(len(usage) for usage, _ in rows)
    return "usage: %finetune SUBCOMMAND\n" + "\n".join(f"  {usage:<{width}}  {text}" for usage, text in rows)
