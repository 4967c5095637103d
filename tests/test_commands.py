"""One command table for both front ends: each offers exactly the commands it gives it."""
from __future__ import annotations

import argparse

from nb_finetune import commands
from nb_finetune.cli import build_parser
from nb_finetune.magics import FinetuneMagics


def cli_commands() -> dict[str, str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def magic_commands() -> set[str]:
    return {name.removeprefix("_do_") for name in dir(FinetuneMagics) if name.startswith("_do_")}


def test_both_front_ends_offer_the_commands_of_the_one_table():
    assert cli_commands() == {c.name: c.cli for c in commands.for_cli()}
    assert magic_commands() == {c.name for c in commands.for_magics()}
    assert all(c.cli or c.magic for c in commands.COMMANDS)  # every command is offered somewhere


def test_the_commands_both_offer_and_the_magics_help():
    both = {c.name for c in commands.for_cli()} & {c.name for c in commands.for_magics()}
    assert both == {"probe", "export", "runs", "assets"}
    usage = commands.magic_usage()
    assert all(f"  {c.name}" in usage and c.magic in usage for c in commands.for_magics())
    assert "sweep" not in usage and "  data [PATH]" in usage
