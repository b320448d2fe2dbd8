"""A cheap necessary condition for an explosion finding, so the full check runs on few points.

An optimisation with its own state: on a run that is only getting better, checking the loss
costs two comparisons per step instead of the median of a window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors.explosion import ExplosionDetector, middle_values

REBASE_EVERY = 16  # points between two refreshes of the gate's baseline


@dataclass
class ExplosionGate:
    """The gate of one tag.

    The detector fires only on a point at least ``min_ratio`` times its baseline median, or on
    ``growth_points`` strictly rising points. The gate keeps that median from the last full
    check (refreshed every ``REBASE_EVERY`` points) and lets a point through when it is above
    half that margin, or ends a run of rises.
    """

    bar: float = -math.inf
    prev: float = math.nan
    rises: int = 0
    since: int = 0

    def admits(self, value: float, *, runaway_rises: int) -> bool:
        """Whether the point ``value`` could make the detector fire (counts it either way)."""
        self.rises = self.rises + 1 if value > self.prev else 0
        self.prev, self.since = value, self.since + 1
        return value >= self.bar or self.rises >= runaway_rises or self.since >= REBASE_EVERY

    def run_through(
        self,
        values: Sequence[float],
        detector: ExplosionDetector,
        window_at: Callable[[int], np.ndarray],
    ) -> int:
        """Batch twin of :meth:`admits` then :meth:`rebase`, over ``values`` in turn.

        At each point the gate admits, ``window_at(i)`` is the window the full check would
        read. Where the check might find something (``detector.could_fire``), stops, the gate
        as it was before point ``i`` (the point-by-point path judges it), and returns ``i``;
        returns ``len(values)`` when it went through all of them.
        """
        runaway_rises = detector.growth_points - 1
        for i, value in enumerate(values):
            rises = self.rises + 1 if value > self.prev else 0
            since = self.since + 1
            if value >= self.bar or rises >= runaway_rises or since >= REBASE_EVERY:
                if not self._rebase_many(window_at(i), detector):
                    return i
                self.rises, self.prev = rises, value  # and since = 0: rebased
            else:
                self.rises, self.prev, self.since = rises, value, since
        return len(values)

    def rebase(self, values: np.ndarray, detector: ExplosionDetector) -> None:
        """Refresh the bar from the window the full check just read."""
        self.since = 0
        base = values[np.isfinite(values)][: -detector.confirm][-detector.window :]
        if base.size < detector.min_history:
            self.bar = -math.inf
            return
        med = float(np.median(base))
        self.bar = med + 0.5 * (detector.min_ratio - 1.0) * abs(med)

    def _rebase_many(self, values: np.ndarray, detector: ExplosionDetector) -> bool:
        """:meth:`rebase` after a check that finds nothing, else False (the gate unchanged).

        The baseline's median from one partition, shared with ``could_fire``: the same float
        as np.median (the middle value, or the two middle ones summed and halved)."""
        finite = np.isfinite(values)
        base = (values if bool(finite.all()) else values[finite])[: -detector.confirm]
        base = base[-detector.window :]
        middle = middle_values(base) if base.size else None
        if detector.could_fire(values, middle=middle):
            return False
        self.since = 0
        if middle is None or base.size < detector.min_history:
            self.bar = -math.inf
            return True
        med = (middle[0] + middle[1]) / 2  # np.median's mean of two (one value: itself)
        self.bar = med + 0.5 * (detector.min_ratio - 1.0) * abs(med)
        return True

    def state(self) -> list[float | int | str]:
        return [schema.json_number(self.bar), schema.json_number(self.prev), self.rises, self.since]

    @classmethod
    def from_state(cls, state: list[float | int | str]) -> ExplosionGate:
        bar, prev, rises, since = state
        return cls(float(bar), float(prev), int(rises), int(since))
