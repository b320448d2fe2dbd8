"""Slow-progress detector: a training loss that has fallen in a straight line since the start.

The update-ratio rule ("about 1e-3") cannot see every LR that is too low: small networks sit at
1-2e-2 at their tuned LR, so the same network at 0.03x is at ~1e-3 and looks healthy (the zoo's
MLPs and CNN, bench/zoo). The loss curve's *shape* sees it. At a good LR a loss falls fast, then
flattens: the slope over the last third of the run so far is a small fraction of the slope over
the first third. At an LR far too low the run never leaves its first, linear phase: the loss
falls at the same rate from the start, clearly and steadily. That is what this detector flags.

The rule, on the run's whole (thinned) loss history: the run is seen from its beginning (a
resumed run's file starts late and its shape says nothing about its start); it has enough
points and is past its warm-up by ``warmup_factor`` times the warm-up's length; the losses in
its first and last thirds both fall clearly (one-sided Kendall p below ``alpha``, on medians of
up to ``bins`` bins per third, which also bounds the cost); and the last third's Theil-Sen slope
is at least ``min_ratio`` times the first third's. Info only: the policy advises raising the LR.

Example:
    >>> import numpy as np
    >>> steps = np.arange(1, 151)
    >>> straight = 2.3 - 0.004 * steps + 0.01 * np.sin(steps)
    >>> f = SlowProgressDetector().check(steps, straight, tag="loss")
    >>> f.kind.value, f.severity.value, round(f.evidence["slope_ratio"], 1)
    ('slow_progress', 'info', 1.0)
    >>> curved = 0.2 + 2.1 * np.exp(-steps / 15)
    >>> SlowProgressDetector().check(steps, curved, tag="loss") is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    Steps,
    Values,
    as_window,
    fmt,
    kendall,
    quiet_numpy,
    theil_sen,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding


@dataclass(frozen=True)
class SlowProgressDetector:
    """Flag a loss still falling as fast as it did at the start of the run.

    Args:
        min_ratio: least last-third / first-third slope. 0.5: in the zoo's tuning split
            (bench/zoo: 4 tasks, seeds 0-1, LR x0.01-x1) good runs sat at 0.00-0.25 from 60
            points on, runs at 0.01x-0.03x at 0.8-2.9 over their first 100-200 steps.
        alpha: one-sided Kendall p below which a third "falls clearly". 0.01: a noisy loss
            (the zoo's regression task) must not pass by chance.
        min_points: fewer finite points give no verdict. 100: a healthy Adam MLP on digits
            (tests/test_scenarios.py) is still in its first, straight fall at 60-90 steps and
            has flattened by 100; the zoo's runs at 0.01x-0.03x are still straight at 100-200.
        bins: a third with more points is summarised by this many bin medians before the
            tests. 20: robust to minibatch noise, and a bounded cost on a long run.
        start_fraction: the history must begin at or before this fraction of its last step.
            0.05: a run watched from (near) its start, not a resumed one.
        warmup_factor: no verdict before ``warmup_factor`` times the step at which the LR
            reached its peak. 3.0: the first third is then the warm-up at most, not the
            steep fall that follows it.
    """

    min_ratio: float = 0.5
    alpha: float = 0.01
    min_points: int = 100
    bins: int = 20
    start_fraction: float = 0.05
    warmup_factor: float = 3.0

    def __post_init__(self) -> None:
        bad = not (0 < self.alpha < 1 and self.min_ratio > 0 and 0 <= self.start_fraction < 1)
        if bad or self.min_points < 12 or self.bins < 4 or self.warmup_factor < 1:
            raise ConfigError(
                "slow_progress needs 0 < alpha < 1, min_ratio > 0, 0 <= start_fraction < 1, "
                f"min_points >= 12, bins >= 4 and warmup_factor >= 1, got alpha={self.alpha} "
                f"min_ratio={self.min_ratio} start_fraction={self.start_fraction} "
                f"min_points={self.min_points} bins={self.bins} "
                f"warmup_factor={self.warmup_factor}"
            )

    @quiet_numpy
    def check(
        self, steps: Steps, values: Values, *, tag: str, peak_step: int | None = None
    ) -> Finding | None:
        """An info ``slow_progress`` finding at the last point, or None.

        ``steps``/``values``: the loss's whole history (thinned), oldest first; ``peak_step``:
        the step at which the LR reached its peak (the end of a warm-up), if known.
        """
        s, v = as_window(steps, values)
        if v.size == 0 or not np.isfinite(v[-1]):
            return None
        keep = np.isfinite(v)
        s, v = s[keep], v[keep]
        last = int(s[-1])
        if v.size < self.min_points or s[0] > self.start_fraction * last:
            return None
        if peak_step is not None and last < self.warmup_factor * peak_step:
            return None
        n = v.size // 3
        first, final = self._binned(s[:n], v[:n]), self._binned(s[-n:], v[-n:])
        slopes = theil_sen(*first), theil_sen(*final)
        if slopes[0] is None or slopes[1] is None or not slopes[0] < 0 or not slopes[1] < 0:
            return None
        ratio = slopes[1] / slopes[0]
        if ratio < self.min_ratio:  # the cheap test first: most runs end here
            return None
        falls = [kendall(*third, alternative="less") for third in (first, final)]
        if any(f is None or f[1] >= self.alpha for f in falls):
            return None
        p_first, p_last = (f[1] for f in falls if f is not None)
        evidence = {
            "slope_ratio": ratio,
            "first_slope": slopes[0],
            "last_slope": slopes[1],
            "first_p_value": p_first,
            "last_p_value": p_last,
            "first_steps": [int(s[0]), int(s[n - 1])],
            "last_steps": [int(s[-n]), last],
            "points": int(v.size),
        }
        message = (
            f"{tag}: still falling as fast as at the start: slope over steps {int(s[-n])}-"
            f"{last} is {fmt(ratio)}x the slope over steps {int(s[0])}-{int(s[n - 1])} "
            "(a run at a good LR flattens after its first fall)"
        )
        kind, info = schema.Kind.SLOW_PROGRESS, schema.Severity.INFO
        return Finding(kind, last, tag, info, evidence, message)

    def _binned(self, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A third as (steps, losses), or as ``bins`` bin medians when it has more points
        (equal bins over its newest ``bins * k`` points: one vectorised median)."""
        x = s.astype(np.float64)
        k = v.size // self.bins
        if k < 2:
            return x, v
        keep = slice(v.size - k * self.bins, None)
        return (
            np.median(x[keep].reshape(self.bins, k), axis=1),
            np.median(v[keep].reshape(self.bins, k), axis=1),
        )
