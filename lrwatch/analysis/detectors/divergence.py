"""Divergence detector: a training loss that sits well above where the run began and is not
coming back down.

The explosion detector sees a loss or gradient norm *leave* its recent band. Once a run has
diverged, its recent band is the diverged level: a loss stuck at 70 after starting at 4.6 (a
character model at 100x its LR), or a classifier flat at 1e10, is no longer a spike, and
nothing else flags it. An LR cut answers the first spike; if the loss is still far above its
start and not falling some steps later, the cut was not enough. This detector says so at every
point while it holds, so the policy can cut again (after a short settling time) and, once the
cut budget is spent, stop a run that no LR saves.

The rule: the median of the last ``points`` finite losses is at least ``ratio`` times the
loss's starting level (its median over the run's first points, which the analyzer passes as
``scale``), the last point is too, and the points are not clearly falling (a one-sided Kendall
test for a fall, p below ``alpha``, means a recovery is under way: wait). A model that scores
worse than at initialisation, for ``points`` logged steps in a row, has diverged. Positive
losses only (a loss that can be <= 0 has no multiplicative "start level").

Example:
    >>> import numpy as np
    >>> stuck = np.r_[np.full(20, 4.6), np.full(12, 70.0) + np.arange(12) % 3]
    >>> f = DivergenceDetector().check(np.arange(32), stuck, tag="loss", scale=4.6)
    >>> f.kind.value, f.severity.value, round(f.evidence["ratio"])
    ('divergence', 'critical', 15)
    >>> falling = np.r_[np.full(20, 4.6), 70.0 - 5 * np.arange(12)]
    >>> DivergenceDetector().check(np.arange(32), falling, tag="loss", scale=4.6) is None
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lrwatch import schema
from lrwatch.analysis.detectors._window import Steps, Values, as_window, fmt, kendall, quiet_numpy
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding


@dataclass(frozen=True)
class DivergenceDetector:
    """Flag a loss stuck at ``ratio`` times its starting level or more, not falling.

    Args:
        ratio: least multiple of the starting loss. 3.0: in the zoo's quick sweep (bench/zoo,
            48 runs without lrwatch) the 10-point loss median of runs that did not blow up
            peaked at 1.24x their start; blown-up ones at 6.5x to 1e29x.
        points: finite points in the median and the fall test. 10: one bad batch, or two,
            cannot make a median; ten points follow a cut's effect within tens of steps.
        alpha: one-sided Kendall p below which the points are falling (a recovery: no
            finding). 0.05: a recovering loss need not fall cleanly to be left alone.
    """

    ratio: float = 3.0
    points: int = 10
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not self.ratio > 1 or self.points < 4 or not 0 < self.alpha < 1:
            raise ConfigError(
                f"divergence needs ratio > 1, points >= 4 and 0 < alpha < 1, got "
                f"{self.ratio}, {self.points} and {self.alpha}"
            )

    def could_fire(self, value: float, scale: float | None) -> bool:
        """Cheap gate: only a point at ``ratio`` times the start level can make a finding."""
        return scale is not None and scale > 0 and value >= self.ratio * scale

    def could_fire_many(self, values: Values, scale: float | None) -> NDArray[np.bool_]:
        """Batch twin of :meth:`could_fire`, per point of ``values``."""
        if scale is None or not scale > 0:
            return np.zeros(values.shape, dtype=bool)
        return np.asarray(values >= self.ratio * scale)

    @quiet_numpy
    def check(
        self, steps: Steps, values: Values, *, tag: str, scale: float | None
    ) -> Finding | None:
        """A critical ``divergence`` finding at the last point, or None."""
        if scale is None or not (math.isfinite(scale) and scale > 0):
            return None
        s, v = as_window(steps, values)
        keep = np.isfinite(v)
        s, v = s[keep][-self.points :], v[keep][-self.points :]
        if v.size < self.points or not self.could_fire(float(v[-1]), scale):
            return None
        med = float(np.median(v))
        if med < self.ratio * scale:
            return None
        fall = kendall(s.astype(np.float64), v, alternative="less")
        if fall is not None and fall[1] < self.alpha:
            return None  # coming back down: let the last cut work
        evidence = {
            "value": float(v[-1]),
            "median": med,
            "start_level": float(scale),
            "ratio": med / scale,
            "points": int(v.size),
            "first_step": int(s[0]),
            "fall_p_value": None if fall is None else fall[1],
        }
        message = (
            f"{tag}: median {fmt(med)} over its last {v.size} points (steps {int(s[0])}-"
            f"{int(s[-1])}) is {fmt(med / scale)}x its starting level {fmt(scale)} and not "
            "falling: the run has diverged"
        )
        return Finding(
            schema.Kind.DIVERGENCE, int(s[-1]), tag, schema.Severity.CRITICAL, evidence, message
        )
