"""Explosion detector: a gradient-norm or loss spike against robust recent history.

The rule, evaluated at the last point (the current step):

1. Baseline: the ``window`` finite points before the last ``confirm`` points. Positive series
   (grad norms, cross-entropy) are compared in log space, where growth is additive and a 10x
   jump means the same at every scale; a series with a value <= 0 falls back to linear space.
2. Spike: the point's robust z-score ``(x - median) / sigma`` (sigma = 1.4826 * MAD, floored)
   reaches ``z_warning`` and the point is at least ``min_ratio`` times the baseline median.
3. Severity: a spike is a warning. It is critical only when it is sustained, i.e. the last
   ``confirm`` points are all spikes, and large (``ratio >= critical_ratio`` or
   ``z >= z_critical``). A single spike that falls back is therefore never critical, and the
   point after it (back in the band) yields no finding at all.
4. Runaway (needs no history): the last ``growth_points`` points each rose and the last is
   ``growth_factor`` times the first. Critical: it catches a run that diverges from its first
   steps, before a baseline exists.
5. Trend (positive series, at least ``trend_history`` baseline points): the last
   ``trend_points`` points rise significantly (Kendall's tau, one-sided p < ``trend_alpha``),
   the last ``confirm`` are all at least ``min_ratio`` times the baseline median, and the last
   is ``trend_ratio`` times it with a robust z of at least ``trend_z``. This sees a divergence
   whose loss is too noisy for the 6-sigma spike test (a regression loss whose log-space sigma
   is 0.5 needs a 20x jump for z = 6) while it is still climbing, before it overflows. A warning
   (critical from ``critical_ratio``).

6. Noise floor (when the caller passes the series' ``scale``, as the analyzer does for the
   loss: its level over the run's first points): a spike, runaway or trend must also rise above
   every point of the baseline and add at least ``noise_floor`` times that scale to the median.
   Minibatch noise on a near-zero loss (0.001 -> 0.005) is a huge ratio in log space but is
   nothing on the loss's own scale, and a heavy-tailed loss whose hard batches reach 3x its
   median every few dozen steps has those batches in its baseline.

Evidence: ``value``, ``median`` (of the baseline, in the series' units), ``mad`` and ``sigma``
(in log units when ``space == "log"``), ``robust_z``, ``ratio`` (value / median),
``growth_rate`` (multiplicative growth per step since the point before the spike run),
``consecutive`` (spike points in a row, at most ``confirm``), ``history`` (baseline points),
``rule`` (``spike``, ``runaway`` or ``trend``), ``space`` (``log`` or ``linear``) and, for the
trend rule, ``trend_tau`` and ``trend_p_value``.

The aim is to see a divergence coming before its first NaN: gradient norms usually grow by
orders of magnitude several steps before the loss overflows.

Example:
    >>> import numpy as np
    >>> steps = np.arange(40)
    >>> norms = np.r_[np.full(37, 1.0) * 1.02 ** (np.arange(37) % 3), 30.0, 300.0, 3000.0]
    >>> f = ExplosionDetector().check(steps, norms, tag="lrwatch/grad_norm")
    >>> f.severity.value, round(f.evidence["ratio"])
    ('critical', 2941)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    MAD_TO_SIGMA,
    Steps,
    Values,
    as_window,
    fmt,
    kendall,
    quiet_numpy,
    robust_center,
    trailing_run,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding


@dataclass(frozen=True)
class ExplosionDetector:
    """Flag a spike or sustained exponential growth at the last point of a positive series.

    Args:
        window: baseline length in points. 100: a stable median, yet it follows a schedule.
        min_history: fewer baseline points than this give no verdict. 30: a median of fewer
            points is itself noise, and the first steps of a run are not a history (in the
            zoo, Adam's grad norm doubled at step 16 of a healthy CNN run); a run diverging
            from its first steps is the runaway rule's.
        z_warning: robust z that makes a spike. 6.0: OLMo's mean + 6 sigma rule, made robust.
        z_critical: robust z that makes a sustained spike critical. 20.0: far outside any noise.
        min_ratio: a spike is also at least this multiple of the median. 2.0: with a tight
            MAD a 10% wobble would pass the z test alone; Lightning's SpikeDetection uses 3x a
            mean, llm-foundry 2x.
        critical_ratio: multiple of the median that makes a sustained spike critical. 10.0: an
            order of magnitude is what precedes overflow in the diverging runs we replayed.
        confirm: consecutive spike points for "sustained". 3: one or two points can be a bad
            batch; three in a row at the logging cadence is a trend.
        sigma_floor: smallest sigma, in log units (relative units in linear space). 0.01: a
            near-constant series must not turn a 1% wobble into an infinite z.
        growth_points: a runaway is this many points, each above the one before. 5: four
            rises in a row, needing no history, so a run that diverges from its first steps
            is still flagged before it overflows.
        growth_factor: ...and a total rise of at least this factor. 100.0: two orders of
            magnitude in four steps never happens in a healthy run, even at start-up.
        trend_points: points whose rank trend is tested by the trend rule. 8: the shortest
            window where a one-sided 1% Kendall test can pass with a few points out of order.
        trend_alpha: one-sided p-value below which the trend rule's points are rising. 0.01.
        trend_ratio: least multiple of the baseline median for the trend rule's last point.
            3.0: noisy healthy losses reach 2x their median; 3x with 3 points over 2x and a
            significant climb did not occur in any healthy or non-diverging labelled run.
        trend_z: least robust z for the trend rule's last point. 2.0: beyond the noise, on a
            series whose noise is too wide for ``z_warning``.
        trend_history: least baseline points for the trend rule. 50: a run's first tens of
            steps have bumps that recover by themselves; the rule watches an established run.
        noise_floor: with a ``scale``, least rise above the median as a fraction of it. 0.05:
            a classifier's loss at 0.005 against a start of 2.3 is noise; one back at 0.3 is
            not, if it also tops every recent point.
        lone_ratio: a spike of fewer than ``confirm`` points below this multiple of the median
            is only ``info`` (recorded, never acted on). 5.0: with a gradient norm every step,
            healthy runs show lone batches at 2-3x their median (a 2.25x one in the healthy
            scenario); the blow-ups we replayed jumped 10x to 1000x at their first point.
    """

    window: int = 100
    min_history: int = 30
    z_warning: float = 6.0
    z_critical: float = 20.0
    min_ratio: float = 2.0
    critical_ratio: float = 10.0
    confirm: int = 3
    sigma_floor: float = 0.01
    growth_points: int = 5
    growth_factor: float = 100.0
    trend_points: int = 8
    trend_alpha: float = 0.01
    trend_ratio: float = 3.0
    trend_z: float = 2.0
    trend_history: int = 50
    noise_floor: float = 0.05
    lone_ratio: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_history <= self.window:
            raise ConfigError(
                f"explosion needs 1 <= min_history <= window, got {self.min_history} and "
                f"{self.window}; raise window or lower min_history"
            )
        if not 0 < self.z_warning <= self.z_critical:
            raise ConfigError(
                f"explosion needs 0 < z_warning <= z_critical, got {self.z_warning} and "
                f"{self.z_critical}"
            )
        if not 1.0 < self.min_ratio <= self.critical_ratio:
            raise ConfigError(
                f"explosion needs 1 < min_ratio <= critical_ratio, got {self.min_ratio} and "
                f"{self.critical_ratio}"
            )
        if self.growth_points < 3 or not self.growth_factor > 1:
            raise ConfigError(
                f"explosion needs growth_points >= 3 and growth_factor > 1, got "
                f"{self.growth_points} and {self.growth_factor}"
            )
        if self.trend_points < 4 or not 0 < self.trend_alpha < 1 or self.trend_history < 1:
            raise ConfigError(
                f"explosion needs trend_points >= 4, 0 < trend_alpha < 1 and trend_history >= 1,"
                f" got {self.trend_points}, {self.trend_alpha} and {self.trend_history}"
            )
        if not self.trend_ratio > 1 or self.trend_z < 0:
            raise ConfigError(
                f"explosion needs trend_ratio > 1 and trend_z >= 0, got {self.trend_ratio} "
                f"and {self.trend_z}"
            )
        if not self.noise_floor >= 0:
            raise ConfigError(f"explosion needs noise_floor >= 0, got {self.noise_floor}")
        if not self.lone_ratio >= 1:  # at or below min_ratio: every lone spike is a warning
            raise ConfigError(f"explosion needs lone_ratio >= 1, got {self.lone_ratio}")
        if self.confirm < 1 or not self.sigma_floor > 0:
            raise ConfigError(
                f"explosion needs confirm >= 1 and sigma_floor > 0, got {self.confirm} and "
                f"{self.sigma_floor}"
            )

    @quiet_numpy
    def check(
        self, steps: Steps, values: Values, *, tag: str, scale: float | None = None
    ) -> Finding | None:
        """Finding if the last point is a spike or a runaway, else None.

        ``scale``: the series' own level (the loss at the start of the run) for the noise floor;
        None for series whose every spike matters (gradient norms).
        """
        s, v = as_window(steps, values)
        if v.size == 0 or not math.isfinite(float(v[-1])):
            return None  # a NaN at the last point is the non-finite detector's
        keep = np.isfinite(v)
        s, v = s[keep], v[keep]
        log_space = bool(np.all(v > 0))
        base = v[: max(v.size - self.confirm, 1)][-self.window :]
        med, sigma = robust_center(_tx(base, log_space))
        sigma = max(sigma, self.sigma_floor * (1.0 if log_space else max(abs(med), 1e-12)))
        z = (_tx(v[-self.confirm :], log_space) - med) / sigma
        ratio = _ratio(v[-self.confirm :], med, log_space)
        spike = (z >= self.z_warning) & (ratio >= self.min_ratio) & (base.size >= self.min_history)
        loud = self._loud(v[-self.confirm :], base, scale)
        spike &= loud
        runaway = log_space and self._is_runaway(v) and bool(loud[-1] or scale is None)
        trend = None
        if log_space and not (spike[-1] or runaway) and bool(loud[-1]):
            trend = self._trend(v, z=float(z[-1]), ratio=ratio, history=base.size)
        if not (spike[-1] or runaway or trend is not None):
            return None
        run = trailing_run(spike)
        big = ratio[-1] >= self.critical_ratio or z[-1] >= self.z_critical
        critical = runaway or (run >= self.confirm and big)
        if trend is not None:
            critical = bool(ratio[-1] >= self.critical_ratio)
        lone = bool(spike[-1]) and not runaway and run < self.confirm
        minor = lone and float(ratio[-1]) < self.lone_ratio
        evidence = {
            "value": float(v[-1]),
            "median": math.exp(med) if log_space else med,
            "mad": sigma / MAD_TO_SIGMA,
            "sigma": sigma,
            "robust_z": float(z[-1]),
            "ratio": float(ratio[-1]),
            "growth_rate": _growth_rate(s[-max(run, 1) - 1 :], v[-max(run, 1) - 1 :]),
            "consecutive": run,
            "history": int(base.size),
            "rule": "spike" if spike[-1] else "runaway" if runaway else "trend",
            "space": "log" if log_space else "linear",
        }
        if trend is not None:
            evidence.update(trend_tau=trend[0], trend_p_value=trend[1])
        return self._finding(int(s[-1]), tag, evidence, critical=critical, minor=minor)

    def could_fire(self, values: Values, *, middle: tuple[float, float] | None = None) -> bool:
        """Batch twin of :meth:`check`: False only when ``check`` on this window gives None.

        Every rule needs the last point at ``min_ratio`` times the baseline median (the trend
        rule asks that of its last ``confirm`` points) or a runaway; a ``scale`` only removes
        findings. The batch path runs the full check only where this says True. ``middle``:
        the two middle values of the baseline, when the caller has them already.
        """
        last = float(values[-1]) if values.size else math.nan
        if not math.isfinite(last):
            return False
        finite = np.isfinite(values)
        v = values if bool(finite.all()) else values[finite]
        log_space = bool(v.min() > 0)
        tail = v[-self.growth_points :].tolist()
        rising = all(b > a for a, b in zip(tail, tail[1:], strict=False))
        if log_space and len(tail) == self.growth_points and rising:  # as _is_runaway
            if tail[-1] >= self.growth_factor * tail[0]:
                return True
        if middle is None:
            middle = middle_values(v[: max(v.size - self.confirm, 1)][-self.window :])
        lo, hi = middle
        if log_space:  # the median of the logs: the two middle values are the same ones
            excess = math.log(last) - (math.log(lo) + math.log(hi)) / 2
            return not excess < math.log(self.min_ratio) - 1e-9  # a hair short: check decides
        med = (lo + hi) / 2
        ratio = 1.0 + (last - med) / max(abs(med), 1e-12)
        return not ratio < self.min_ratio * (1 - 1e-9)  # a hair short, or NaN: check decides

    def _loud(self, tail: Values, base: Values, scale: float | None) -> np.ndarray:
        """Which tail points clear the noise floor (all of them without a ``scale``)."""
        if scale is None or not math.isfinite(scale) or base.size == 0:
            return np.ones(tail.size, dtype=bool)
        med = float(np.median(base))
        return np.asarray((tail > base.max()) & (tail - med >= self.noise_floor * abs(scale)))

    def _is_runaway(self, v: Values) -> bool:
        """Strictly rising for ``growth_points`` points by ``growth_factor`` overall."""
        tail = v[-self.growth_points :]
        return (
            tail.size == self.growth_points
            and bool(np.all(np.diff(tail) > 0))
            and tail[-1] >= self.growth_factor * tail[0]
        )

    def _trend(
        self, v: Values, *, z: float, ratio: Values, history: int
    ) -> tuple[float, float] | None:
        """(tau, p) when the trend rule holds at the last point (log space), else None."""
        base_n = v.size - self.trend_points
        if history < self.trend_history or base_n < self.trend_history:
            return None
        if ratio[-1] < self.trend_ratio or z < self.trend_z:
            return None
        if bool(np.any(ratio[-self.confirm :] < self.min_ratio)):
            return None
        tail = np.log(v[-self.trend_points :])
        x = np.arange(tail.size, dtype=np.float64)
        res = kendall(x, tail, alternative="greater")
        return res if res is not None and res[1] < self.trend_alpha else None

    def _finding(
        self, step: int, tag: str, ev: dict[str, Any], *, critical: bool, minor: bool
    ) -> Finding:
        severity = schema.Severity.CRITICAL if critical else schema.Severity.WARNING
        if minor:  # a lone, moderate spike: minibatch noise until it repeats or grows
            severity = schema.Severity.INFO
        if ev["rule"] == "runaway":
            why = f"rose {self.growth_points - 1} times in a row"
        elif ev["rule"] == "trend":
            why = (
                f"climbing over its last {self.trend_points} points, Kendall p "
                f"{fmt(ev['trend_p_value'])}, robust z {fmt(ev['robust_z'])}"
            )
        else:
            why = f"robust z {fmt(ev['robust_z'])}, {ev['consecutive']} spike point(s) in a row"
        message = (
            f"{tag} = {fmt(ev['value'])} at step {step} is {fmt(ev['ratio'])}x its recent median "
            f"{fmt(ev['median'])} ({why}, growth {fmt(100 * ev['growth_rate'])}% per step)"
        )
        return Finding(schema.Kind.EXPLOSION, step, tag, severity, ev, message)


def middle_values(x: Values) -> tuple[float, float]:
    """The two middle values of a non-empty ``x`` (the same one twice for an odd size), from
    one partition: np.median is their mean, computed the same way, at five times the cost."""
    n = x.size
    part = np.partition(x, [(n - 1) // 2, n // 2])
    return float(part[(n - 1) // 2]), float(part[n // 2])


def _tx(x: Values, log_space: bool) -> Values:
    return np.log(x) if log_space else x


def _ratio(v: Values, med: float, log_space: bool) -> Values:
    """How many times the baseline each point is (linear space: 1 + excess over |median|)."""
    if log_space:
        return np.asarray(v / math.exp(med))
    return np.asarray(1.0 + (v - med) / max(abs(med), 1e-12))


def _growth_rate(s: Steps, v: Values) -> float:
    """Multiplicative growth per step from the last point before the spike run to now."""
    span = int(s[-1] - s[0])
    if span <= 0 or v[0] <= 0 or v[-1] <= 0:  # linear space: no multiplicative rate
        return 0.0
    rate = math.exp(math.log(v[-1] / v[0]) / span) - 1.0
    return rate if math.isfinite(rate) else 0.0
