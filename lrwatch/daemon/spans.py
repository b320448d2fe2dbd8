"""The shapes of the daemon's TensorBoard markers along a run's step axis.

TensorBoard connects the points of a tag in the order written, smooths them (0.6 by default),
scales the axis to the smoothed values, and sizes each chart's step axis to its own points. A
chart of a few decision points would therefore zoom onto them, and a one-point spike would be a
slope a fraction of its height. :class:`Spans` gives each marker tag a line across the steps the
run has reached: findings as spikes from a 0 baseline, decisions as staircases; the update-ratio
reference band spans the same steps (see ``tb_layout``'s charts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lrwatch import schema
from lrwatch.schema import ActionKind, Decision

# Reference lines of the update/weight ratio: ~1e-3 is the usual healthy order of magnitude; an
# order of magnitude either side is the band lrwatch's ratio detector tolerates by default.
BAND = {"low": 1e-4, "target": 1e-3, "high": 1e-2}
BAND_TAG_FMT = "lrwatch_daemon/update_ratio_band/{}"
LOG10_BAND_TAG_FMT = "lrwatch_daemon/update_ratio_log10_band/{}"


def band_values() -> dict[str, float]:
    """The band's tags and levels, linear and log10 (for ``schema.UPDATE_RATIO_LOG10``)."""
    out = {BAND_TAG_FMT.format(k): v for k, v in BAND.items()}
    out.update({LOG10_BAND_TAG_FMT.format(k): math.log10(v) for k, v in BAND.items()})
    return out


class Spans:
    """Per-tag points that keep every marker tag's steps increasing and spanning the run.

    TensorBoard connects the points of a tag in the order written, smooths them (0.6 by default)
    and scales the axis to the smoothed values, so a lone point would be a slope, and a one-step
    spike a bump a fraction of its height. Hence two shapes, each carried to the latest step by
    :meth:`extend`:

    - a finding is a spike: 0 at s-1, its severity at s, 0 at s+1 (written lazily: another may
      follow at s+1);
    - a decision moves a staircase (:meth:`step_to`): the level holds from the decision's step on
      (the cumulative LR divisor decided, the clip threshold, 1 after a stop), so the smoothed
      line converges to it as :meth:`extend` adds points (smoothing averages over points).

    Points at or before a tag's last step are dropped, so a restarted daemon (``floor``: the last
    step and value of each tag already on disk) never draws backwards.
    """

    def __init__(self, floor: dict[str, tuple[int, float]] | None = None) -> None:
        floor = floor or {}
        self.last: dict[str, int] = {tag: step for tag, (step, _) in floor.items()}
        self.level: dict[str, float] = {  # a staircase's value now; spikes rest at 0
            tag: value for tag, (_, value) in floor.items() if tag.startswith(DECISIONS)
        }
        self.pending: dict[str, int] = {}  # tag -> step of its trailing 0, not yet written
        self.first: int | None = None  # first step the run was seen at

    def spike(self, tag: str, step: int, value: float) -> list[tuple[int, str, float]]:
        """The points of a marker of ``tag`` at ``step`` (may be empty: a step already drawn)."""
        if step <= self.last.get(tag, -1):
            return []
        out = self._settle(tag, before=step) + self._lead_in(tag, step, 0.0)
        out.append((step, tag, value))
        self.last[tag] = step
        self.pending[tag] = step + 1
        return out

    def step_to(
        self, tag: str, step: int, new: Callable[[float], float], *, start: float = 0.0
    ) -> list[tuple[int, str, float]]:
        """Move ``tag``'s staircase at ``step`` to ``new(current level)`` (``start`` at first)."""
        if step <= self.last.get(tag, -1):
            return []
        old = self.level.get(tag, start)
        out = self._lead_in(tag, step, old)
        self.level[tag] = new(old)
        out.append((step, tag, self.level[tag]))
        self.last[tag] = step
        return out

    def extend(self, step: int, band: dict[str, float]) -> list[tuple[int, str, float]]:
        """Every marker tag at its resting value, and ``band``, at ``step`` (past their last)."""
        out: list[tuple[int, str, float]] = []
        for tag in list(self.pending):
            out += self._settle(tag, before=step + 1)
        for tag in [t for t in self.last if t not in band]:
            if step > self.last[tag]:
                out.append((step, tag, self.level.get(tag, 0.0)))
                self.last[tag] = step
        for tag, level in band.items():
            start = self.first if tag not in self.last and self.first is not None else None
            if start is not None and start < step:
                out.append((start, tag, level))
            if step > self.last.get(tag, -1):
                out.append((step, tag, level))
                self.last[tag] = step
        return out

    def flush(self) -> list[tuple[int, str, float]]:
        """Every pending trailing 0 (the run's latest step is unknown)."""
        return [
            p for tag in list(self.pending) for p in self._settle(tag, before=self.pending[tag] + 1)
        ]

    def _lead_in(self, tag: str, step: int, value: float) -> list[tuple[int, str, float]]:
        """``value`` at the run's first step (a new tag) and at step-1: the line up to ``step``."""
        floor, out = self.last.get(tag, -1), []
        first = [self.first] if tag not in self.last and self.first is not None else []
        for at in [*first, step - 1]:
            if floor < at < step and at >= (self.first or 0):
                out.append((at, tag, value))
                floor = at
        return out

    def _settle(self, tag: str, *, before: int) -> list[tuple[int, str, float]]:
        """Write ``tag``'s pending trailing 0 if it lies before ``before``."""
        at = self.pending.get(tag)
        if at is None or at >= before:
            return []
        del self.pending[tag]
        self.last[tag] = at
        return [(at, tag, 0.0)]


DECISIONS = schema.DECISION_TAG_FMT.format("")


def staircase(decision: Decision) -> tuple[str, Callable[[float], float], float]:
    """(tag, new level from the old, level before any decision) of a decision's staircase."""
    tag = schema.DECISION_TAG_FMT.format(decision.action.value)
    if decision.action is ActionKind.LR_CUT and decision.factor is not None:
        factor = float(decision.factor)
        return tag, lambda old: old * factor, 1.0  # the cumulative divisor, as lr_factor
    if decision.action is ActionKind.CLIP and decision.max_norm is not None:
        max_norm = float(decision.max_norm)
        return tag, lambda old: max_norm, 0.0  # 0: no clip, as clip_max_norm
    if decision.action is ActionKind.STOP:
        return tag, lambda old: 1.0, 0.0
    return tag, lambda old: old + 1.0, 0.0  # advice: how many so far
