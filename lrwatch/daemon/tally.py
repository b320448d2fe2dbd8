"""What ``serve`` has done: the counters of its periodic summary line and its ``--json`` stream.

A person leaving ``lrwatch serve`` open next to a week-long run wants to know, without scrolling,
that it is still reading and what it has seen; a program wants every finding and decision as it
happens, one JSON object per line. :class:`Tally` is told about each event by the daemon's passes
(points read, findings, decisions, acknowledgements) and says both.

JSON lines (``--json``, on stdout; the human log lines stay on stderr), each with ``"event"``:

- ``finding``: a warning or critical finding, as ``Finding.to_json`` plus ``run``, ``decided``
  (it led to a decision in the same pass) and ``why_no_decision`` (else null);
- ``decision``: the audit-log record of a decision (see ``outputs.decision_record``);
- ``acknowledged``: the audit-log record of the trainer's acknowledgement of an action;
- ``summary``: the counters below, since start (``total``) and over the ``last_seconds`` since
  the previous summary (``last``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lrwatch.schema import Finding, Severity

logger = logging.getLogger(__name__)

SUMMARY_EVERY_S = 600.0  # default: every 10 minutes, ~1000 lines over a week-long run


@dataclass
class Counts:
    """Counters of one period (or of the whole session)."""

    points: int = 0  # scalar values read from event files
    findings: int = 0  # warning or critical findings
    decisions: int = 0
    applied: int = 0  # decisions written to a control file
    acknowledged: int = 0  # actions the trainers reported applied


class Tally:
    """Counts what the daemon does and reports it: a summary every ``every`` seconds (0: never),
    and, with ``emit``, every finding and decision as a JSON line.

    Example::

        tally = Tally(every=600, emit=click.echo)   # emit=None: human summary lines only
        tally.points(run_dir, 120)
        tally.maybe_summarize(runs=3)
    """

    def __init__(
        self,
        *,
        every: float = SUMMARY_EVERY_S,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.total = Counts()
        self.period = Counts()
        self._emit = emit
        self._clock = clock
        self._since = clock()

    def points(self, run: Path, n: int) -> None:
        self._add("points", n)

    def findings(
        self,
        run: Path,
        found: Iterable[Finding],
        *,
        decided: Sequence[Finding],
        why: Mapping[Any, str],
    ) -> None:
        """New findings of one pass; those below warning are not counted or emitted."""
        for f in found:
            if f.severity is Severity.INFO:
                continue
            self._add("findings", 1)
            quiet = f not in decided
            reason = why.get((f.kind.value, f.tag, f.step)) if quiet else None
            self._json(
                {
                    "event": "finding",
                    "run": str(run),
                    **f.to_json(),
                    "decided": not quiet,
                    "why_no_decision": reason if quiet else None,
                }
            )

    def decision(self, record: dict[str, Any]) -> None:
        self._add("decisions", 1)
        if record.get("applied"):
            self._add("applied", 1)
        self._json(record)

    def acknowledged(self, record: dict[str, Any]) -> None:
        self._add("acknowledged", 1)
        self._json(record)

    def maybe_summarize(self, *, runs: int, force: bool = False) -> None:
        """Say the summary if ``every`` seconds have passed since the last (or ``force``)."""
        now = self._clock()
        if not force and (self.every <= 0 or now - self._since < self.every):
            return
        seconds = now - self._since
        if self._emit is not None:
            self._json(
                {
                    "event": "summary",
                    "runs": runs,
                    "total": asdict(self.total),
                    "last": asdict(self.period),
                    "last_seconds": round(seconds, 1),
                }
            )
        else:
            logger.info("%s", summary_line(runs, self.total, self.period, seconds))
        self.period, self._since = Counts(), now

    def _add(self, name: str, n: int) -> None:
        for counts in (self.total, self.period):
            setattr(counts, name, getattr(counts, name) + n)

    def _json(self, doc: dict[str, Any]) -> None:
        if self._emit is not None:
            self._emit(json.dumps(doc, allow_nan=False))


def summary_line(runs: int, total: Counts, period: Counts, seconds: float) -> str:
    """One line: runs watched, then what was read and decided, in total and lately."""
    return (
        f"summary: {runs} run(s) watched; {total.points:,} points read, {total.findings} "
        f"finding(s) at warning or above, {total.decisions} decision(s) ({total.applied} "
        f"applied, {total.acknowledged} acknowledged); last {_duration(seconds)}: "
        f"+{period.points:,} points, +{period.findings} findings, +{period.decisions} decisions"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
