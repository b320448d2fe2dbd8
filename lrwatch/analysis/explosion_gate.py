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
from lrwatch.analysis.detectors.explosion import ExplosionDetector

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
        look: Callable[[int], np.ndarray | None],
    ) -> int:
        """Batch twin of :meth:`admits` then :meth:`rebase`, over ``values`` in turn.

        At each point the gate admits, ``look(i)`` returns the window the full check would
        read, or None when that check might find something. Stops there, the gate as it was
        before point ``i`` (the point-by-point path judges it), and returns ``i``; returns
        ``len(values)`` when it went through all of them.
        """
        runaway_rises = detector.growth_points - 1
        for i, value in enumerate(values):
            rises = self.rises + 1 if value > self.prev else 0
            since = self.since + 1
            if value >= self.bar or rises >= runaway_rises or since >= REBASE_EVERY:
                window = look(i)
                if window is None:
                    return i
                self.rises, self.prev, self.since = rises, value, since
                self._rebase_many(window, detector)
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

    def _rebase_many(self, values: np.ndarray, detector: ExplosionDetector) -> None:
        """:meth:`rebase` with the median from one partition: the same float as np.median
        (the middle value, or the two middle ones summed and halved), at a fifth of the cost."""
        self.since = 0
        finite = np.isfinite(values)
        base = (values if bool(finite.all()) else values[finite])[: -detector.confirm]
        base = base[-detector.window :]
        n = base.size
        if n < detector.min_history:
            self.bar = -math.inf
            return
        middle = np.partition(base, [(n - 1) // 2, n // 2])
        med = float(middle[n // 2]) if n % 2 else float((middle[n // 2 - 1] + middle[n // 2]) / 2)
        self.bar = med + 0.5 * (detector.min_ratio - 1.0) * abs(med)

    def state(self) -> list[float | int | str]:
        return [schema.json_number(self.bar), schema.json_number(self.prev), self.rises, self.since]

    @classmethod
    def from_state(cls, state: list[float | int | str]) -> ExplosionGate:
        bar, prev, rises, since = state
        return cls(float(bar), float(prev), int(rises), int(since))
