"""User-facing errors.

Every problem a user can fix (bad config, bad data, unknown model) is raised as a
`UserError` whose message names the problem and the fix in one line. The command line
prints it without a traceback; panels show it beside the control.
"""
from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the one-line message to show."""


@dataclass(frozen=True)
class Problem:
    field: str      # dotted path, e.g. "train.learning_rate"
    value: object   # the offending value
    accepted: str   # what would be accepted, in words

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.accepted}"


class ConfigError(UserError):
    """All problems found in a config, reported together (never one per attempt)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the config: "
        super().__init__(head + "; ".join(str(p) for p in self.problems))
