"""Batch analysis: a run's new points judged a chunk at a time, with the point path's results.

The point-by-point path (:meth:`.analyzer.RunAnalyzer.feed` with ``batch=False``) runs every
detector of a tag's role at each new point: ~10-25 us of Python and numpy per point, which set
the speed of ``analyze`` and of a daemon watching a fleet. Almost every point of a healthy run
changes nothing but the history: no finding, no condition, no decision. Here, per chunk of at
most ``CHUNK_POINTS`` points, vectorised screens (:mod:`.role_screens`, each a necessary
condition written beside its detector's ``check``) mark the steps where something could happen;
only those steps go through the point path, at the same history, and everything between them
is added in bulk (the history, the point counts, the explosion gates). Findings, decisions and
the analyzer's saved state are the same as point by point; ``tests/test_batch_analysis.py``
checks that on real runs, scenarios and random streams.

Anything the screens cannot vouch for goes through the point path: a tag seen for the first
time, a step logged again (a resumed trainer), a role or a condition the screens do not know.
A detector that ``AnalyzerConfig`` holds but this module does not know turns the batch path off
for the whole analyzer (:func:`supported`).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import operator
from collections.abc import Callable

import numpy as np

from lrwatch import schema
from lrwatch.analysis.config import AnalyzerConfig
from lrwatch.analysis.explosion_gate import ExplosionGate
from lrwatch.analysis.history import History
from lrwatch.analysis.role_checks import RoleChecks
from lrwatch.analysis.role_screens import RoleScreens, TagRun
from lrwatch.analysis.run_tags import RunTags
from lrwatch.schema import Decision, Scalar

__all__ = ["CHUNK_POINTS", "MIN_POINTS", "BatchFeed", "supported"]

logger = logging.getLogger(__name__)

# Points per chunk (at most, but for a step with more): bounds the arrays built per chunk (a
# few per tag, each at most the chunk's points plus 512) and the rescreening after an event
# that changed what the screens read.
CHUNK_POINTS = 4096
# Fewer points than this go through the point path: a chunk costs ~0.3 ms to set up (history
# windows, screens), the point path ~40 us a step of lrwatch's four per-step tags.
MIN_POINTS = 64
# A chunk whose steps are mostly events (a run with GradScaler's tags: every step) goes point by
# point: each event costs the batch path ~50 us of its own on top of the point path's work.
DENSE = 0.5
# Every AnalyzerConfig field this module knows: the screens cover them, or they run only at
# steps that go through the point path anyway (the metric's, GradScaler's, the policy's).
KNOWN_SETTINGS = frozenset(
    {
        "metric",
        "nonfinite",
        "explosion",
        "divergence",
        "plateau_trend",
        "oscillation",
        "ratio",
        "slow_progress",
        "overfit",
        "amp",
        "schedule",
        "plateau",
        "policy",
    }
)
StepFn = Callable[[int, list[Scalar]], list[Decision]]
FreshFn = Callable[[Scalar | None, Scalar | None], int | None]  # (last ack, last LR) -> after
_TAG, _STEP, _VALUE = (operator.itemgetter(i) for i in (0, 1, 3))  # Scalar's fields


def supported(config: AnalyzerConfig) -> bool:
    """Whether every detector of ``config`` is one the batch path knows (else: point path)."""
    unknown = {f.name for f in dataclasses.fields(config)} - KNOWN_SETTINGS
    if unknown:
        logger.debug("batch analysis off: no batch twin for %s", ", ".join(sorted(unknown)))
    return not unknown


class BatchFeed:
    """Feeds step-sorted points through ``step`` (the point path) only where needed."""

    def __init__(
        self,
        checks: RoleChecks,
        tags: RunTags,
        history: History,
        *,
        step: StepFn,
        fresh_if: FreshFn,
        cut: Callable[[], bool],
    ) -> None:
        self.checks, self.tags, self.history, self.step = checks, tags, history, step
        self.fresh_if, self.cut = fresh_if, cut  # the analyzer's: its last cut, if any
        self.screens = RoleScreens(checks)

    def feed(self, points: list[Scalar]) -> list[Decision]:
        """Judge ``points`` (sorted by step); returns the decisions, as the point path would."""
        if len(points) < MIN_POINTS:  # a daemon's look at one run: the point path is cheaper
            starts = [i for i, p in enumerate(points) if i == 0 or p.step != points[i - 1].step]
            return self._pointwise(points, starts, 0, len(starts))
        out: list[Decision] = []
        lo = 0
        while lo < len(points):
            hi = _chunk_end(points, lo)
            out.extend(self._chunk(points[lo:hi]))
            lo = hi
        return out

    def _chunk(self, points: list[Scalar]) -> list[Decision]:
        cols = _Columns(points)
        new_step = np.diff(cols.steps, prepend=cols.steps[0] - 1) != 0
        starts = np.flatnonzero(new_step).tolist()
        at = np.cumsum(new_step) - 1
        runs = self._runs(points, cols, at)
        if runs is None:  # a step logged again: the history purges, point by point
            return self._pointwise(points, starts, 0, len(starts))
        out: list[Decision] = []
        events = self._screen(runs, len(starts), 0)
        i = 0
        while i < len(starts):
            if events[i:].mean() > DENSE:  # e.g. GradScaler's tags at every step
                return out + self._pointwise(points, starts, i, len(starts))
            i = self._walk(points, starts, runs, events, i, out)
        return out

    def _walk(
        self,
        points: list[Scalar],
        starts: list[int],
        runs: dict[str, TagRun],
        events: np.ndarray,
        i: int,
        out: list[Decision],
    ) -> int:
        """From step ``i``: bulk to each event, the event point by point, until the screens
        must be asked again (then returns where) or the chunk ends."""
        while i < len(starts):
            nxt = np.flatnonzero(events[i:])
            j = self._through_gates(runs, i, i + int(nxt[0]) if nxt.size else len(starts))
            self._bulk(runs, i, j)
            if j == len(starts):
                return j
            key = self._context()
            out.extend(self._pointwise(points, starts, j, j + 1))
            i = j + 1
            if self._context() != key and i < len(starts):
                events[i:] = self._screen(runs, len(starts), i)
                return i
        return i

    def _runs(
        self, points: list[Scalar], cols: _Columns, at: np.ndarray
    ) -> dict[str, TagRun] | None:
        """Each tag's points in the chunk; None when a tag's steps do not rise strictly."""
        runs = {}
        for tag, code in cols.codes.items():
            idx = np.flatnonzero(cols.tags == code)
            if not idx.size:
                continue
            steps = cols.steps[idx]
            last = self.history.last(tag)
            if (last is not None and steps[0] <= last.step) or bool(np.any(np.diff(steps) <= 0)):
                return None
            mine = [points[i] for i in idx.tolist()]
            runs[tag] = TagRun.build(tag, mine, steps, cols.values[idx], at[idx], self.history)
        return runs

    def _screen(self, runs: dict[str, TagRun], n_steps: int, i: int) -> np.ndarray:
        """Which steps from ``i`` on go through the point path, as far as known now."""
        events = np.zeros(n_steps - i, dtype=bool)
        self.screens.prepare(runs, self.history)
        for tag, run in runs.items():
            k0 = int(np.searchsorted(run.at, i))
            if k0 == run.at.size:
                continue
            if tag not in self.tags.known:  # learning it may change the roles
                events[run.at[k0] - i] = True
                continue
            counts = self.tags.counts.get(tag, 0)
            for role in self.tags.by_tag.get(tag, ()):
                mask = self.screens.events(role, run, k0, counts)
                events[run.at[k0:][mask] - i] = True
        flip = self._fresh_flip(runs, i) if self.cut() else None
        if flip is not None:
            events[flip - i] = True
        return events

    def _fresh_flip(self, runs: dict[str, TagRun], i: int) -> int | None:
        """The first step from ``i`` on whose acknowledgement or LR point changes which points
        the LR-judging checks read (``RoleChecks.fresh_after``: the last cut took effect): it
        goes through the point path, and the screens then read the new windows.

        The verdict reads the last ack and the last LR point, whose steps all follow the cut's
        (decided at an event before ``i``): so it can change only at an ack, at the first LR
        point, or where the LR's value changes. Only those are asked."""
        now = self.checks.fresh_after()
        lr_tag = self.tags.roles.get("lr")
        ack_run = runs.get(schema.LR_FACTOR)
        lr_run = None if lr_tag is None else runs.get(lr_tag)
        ask: list[int] = []
        for run, every in ((ack_run, True), (lr_run, False)):
            if run is not None:
                k0 = int(np.searchsorted(run.at, i))
                if k0 < run.at.size:
                    moved = np.flatnonzero(np.diff(run.values[k0:]) != 0) + 1
                    ask += run.at[k0:].tolist() if every else run.at[k0 + moved].tolist()
                    ask.append(int(run.at[k0]))
        for step in sorted(set(ask)):
            ack, lr = _last_at(ack_run, step), _last_at(lr_run, step)
            ack = ack or self.history.last(schema.LR_FACTOR)
            lr = lr or (None if lr_tag is None else self.history.last(lr_tag))
            if self.fresh_if(ack, lr) != now:
                return step
        return None

    def _through_gates(self, runs: dict[str, TagRun], i: int, j: int) -> int:
        """Advance the explosion gates over steps ``i..j-1``; returns the first step (<= j)
        whose point one of them lets through to a check that might find something."""
        gated = [
            (tag, run)
            for tag, run in runs.items()
            if {"loss", "grad_norm"} & set(self.tags.by_tag.get(tag, ()))
        ]
        trial = {tag: dataclasses.replace(self._gate(tag)) for tag, _ in gated}
        stop = j
        for tag, run in gated:
            stop = min(stop, self._gate_run(trial[tag], run, i, stop))
        if stop == j:
            self.checks.gates.update(trial)
            return j
        for tag, run in gated:  # rare: again on the real gates, up to that step
            self._gate_run(self._gate(tag), run, i, stop)
        return stop

    def _gate(self, tag: str) -> ExplosionGate:
        return self.checks.gates.setdefault(tag, ExplosionGate())

    def _gate_run(self, gate: ExplosionGate, run: TagRun, i: int, j: int) -> int:
        k0, k1 = np.searchsorted(run.at, [i, j])
        values = run.values[k0:k1].tolist()
        detector = self.checks.config.explosion
        done = gate.run_through(
            values, detector, lambda k: self.screens.explosion_window(run, int(k0) + k)
        )
        return j if done == len(values) else int(run.at[k0 + done])

    def _bulk(self, runs: dict[str, TagRun], i: int, j: int) -> None:
        """Steps ``i..j-1`` changed nothing but the history and the counts: add them at once."""
        for tag, run in runs.items():
            k0, k1 = (int(k) for k in np.searchsorted(run.at, [i, j]))
            if k1 > k0:
                self.history.extend_run(
                    tag, run.points[k0:k1], run.steps[k0:k1].tolist(), run.values[k0:k1]
                )
                self.tags.counts[tag] = self.tags.counts.get(tag, 0) + k1 - k0

    def _pointwise(self, points: list[Scalar], starts: list[int], i: int, j: int) -> list[Decision]:
        out: list[Decision] = []
        for k in range(i, j):
            end = starts[k + 1] if k + 1 < len(starts) else len(points)
            out.extend(self.step(points[starts[k]].step, points[starts[k] : end]))
        return out

    def _context(self) -> tuple[object, ...]:
        """What the screens read besides the points: when it changes, screen again."""
        c = self.checks
        return (
            tuple(sorted(self.tags.roles.items())),
            frozenset(c.conditions.active),
            c.fresh_after(),
            frozenset(self.tags.known),
            frozenset(t for t in self.tags.known if c.opening_known(t)),
        )


def _chunk_end(points: list[Scalar], lo: int) -> int:
    """The end of the chunk of ``points`` (sorted by step) that starts at ``lo``: about
    ``CHUNK_POINTS`` points, ending at a step boundary (a longer step is a chunk of its own)."""
    hi = lo + CHUNK_POINTS
    if hi >= len(points):
        return len(points)
    end = bisect.bisect_left(points, points[hi].step, lo, hi, key=_STEP)
    return end if end > lo else bisect.bisect_right(points, points[lo].step, lo, key=_STEP)


def _last_at(run: TagRun | None, step: int) -> Scalar | None:
    """``run``'s last point at chunk step ``step`` or before (None: none in the chunk)."""
    if run is None:
        return None
    k = int(np.searchsorted(run.at, step, side="right"))
    return run.points[k - 1] if k else None


class _Columns:
    """Steps, values and tag codes of a list of points, as arrays (one pass each)."""

    def __init__(self, points: list[Scalar]) -> None:
        n = len(points)  # map and itemgetter: C loops, a third of a generator's cost
        tags = list(map(_TAG, points))
        self.codes: dict[str, int] = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
        self.tags = np.fromiter(map(self.codes.__getitem__, tags), np.int64, n)
        self.steps = np.fromiter(map(_STEP, points), np.int64, n)
        self.values = np.fromiter(map(_VALUE, points), np.float64, n)
