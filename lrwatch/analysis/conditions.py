"""Ongoing conditions, so a finding is reported once, and again only when it worsens.

The rule is the same for every detector: a check that finds something continues the condition
(kind, tag) it is part of; a check that finds nothing ends it, so its next occurrence is
reported anew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lrwatch.schema import Finding, Kind, Severity

_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


@dataclass
class Condition:
    """An ongoing condition: its worst severity so far and the step it was first reported."""

    severity: Severity
    since: int


class Conditions:
    """The ongoing conditions of one run, keyed by (kind, tag)."""

    def __init__(self) -> None:
        self.active: dict[tuple[Kind, str], Condition] = {}

    def report(self, kind: Kind, tag: str, f: Finding | None) -> bool:
        """Take a check's result; True when ``f`` is news (a new or a worse condition)."""
        key = (kind, tag)
        if f is None:
            self.active.pop(key, None)
            return False
        cond = self.active.get(key)
        if cond is None or _RANK[f.severity] > _RANK[cond.severity]:
            self.active[key] = Condition(f.severity, f.step)
            return True
        return False

    def end(self, kind: Kind, tag: str) -> None:
        """End a condition without a check of its own (another check answered for it)."""
        self.active.pop((kind, tag), None)

    def ongoing(self, kind: Kind, tag: str | None) -> bool:
        return (kind, tag) in self.active

    def state(self) -> list[list[Any]]:
        return [[k.value, t, c.severity.value, c.since] for (k, t), c in self.active.items()]

    def load_state(self, state: list[list[Any]]) -> None:
        self.active = {
            (Kind(k), str(t)): Condition(Severity(sev), int(since)) for k, t, sev, since in state
        }
