"""Oscillation detector: a loss that stopped falling and only jitters inside a band.

Over the last ``jitter_window`` finite loss points (and, for the trend, the last ``window``),
all three must hold:

1. **Flat**: no significant trend over the last ``jitter_window`` points (Kendall's tau,
   two-sided p >= ``alpha``), and the loss is not still falling over the last ``window``
   points (one-sided Kendall p < ``alpha``): at high LR a small network's loss often looks
   flat for 100 steps yet keeps falling over 400. One exception: when the update ratio is
   high (median ``>= ratio_strong``), a significant fall counts only if it is also large, at
   least ``min_fall`` jitter bands (median of the window's first quarter minus median of its
   last quarter, over the 10-90 percentile spread of the jitter window). With 400 points even
   the slow drift of a loss bouncing in a band is significant; in the labelled runs it stayed
   under one band while still-improving runs fell by several.
2. **Jitter**: successive differences flip sign often (``>= min_sign_changes``; white noise gives
   2/3, a random walk 1/2, a smooth curve about 0) and are anti-correlated (lag-1
   autocorrelation ``<= max_autocorr``; white noise gives -0.5, drift 0 or above).
3. **Corroboration**, because a converged run with minibatch noise is flat and jittery too:
   either the update/weight ratio over the same steps is high (median ``>= ratio_mild``), or the
   loss alternates more than white noise can: the turning-point test (a point above or below
   both neighbours), whose count for any i.i.d. noise has mean ``2(n-2)/3`` and variance
   ``(16n-29)/90`` whatever the noise distribution, is ``excess_z`` standard deviations high.
   Being distribution-free matters: a near-zero loss with rare hard batches is heavy-tailed.

Strength, read by the policy (cut by 10, or by 5 when mild): ``strong`` when the ratio median is
``>= ratio_strong``, or ``>= ratio_mild`` together with excess alternation; ``mild`` otherwise.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> steps = np.arange(100)
    >>> loss = 1.0 + 0.05 * (-1.0) ** steps + 0.01 * rng.standard_normal(100)
    >>> f = OscillationDetector().check(steps, loss, tag="lrwatch/loss")
    >>> f.evidence["strength"]
    'mild'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    Steps,
    Values,
    Window,
    as_window,
    finite_tail,
    fmt,
    kendall,
    lag1_autocorr,
    quiet_numpy,
    sign_change_fraction,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

Strength = Literal["mild", "strong"]


@dataclass(frozen=True)
class OscillationDetector:
    """Flag a flat, jittering loss at the last point, graded mild or strong.

    Args:
        window: loss points examined for a slow fall (pass at least this many). 400: long
            enough that a noisy but still improving run shows a significant trend.
        jitter_window: the most recent points whose jitter is measured. 100: the
            turning-point and autocorrelation statistics are then precise enough to tell
            alternation from white noise.
        min_points: fewer finite points give no verdict. 100 (the whole jitter window): over
            the first tens of steps, or in a warm-up, a loss that has not started falling yet
            is not one that stopped; rank tests on fewer points also have little power.
        alpha: a trend with p below this means the loss is still moving. 0.05: the usual level;
            a still-falling run rarely fails it over 100 points.
        min_sign_changes: least fraction of sign flips of the differences. 0.55: between a
            random walk (0.5) and white noise (0.67), so noise qualifies and drift does not.
        max_autocorr: largest lag-1 autocorrelation of the differences. -0.3: white noise sits
            at -0.5, a drifting or smooth curve at 0 or above.
        excess_z: turning-point z that counts as alternation beyond noise. 2.33: a one-sided
            1% test, so a noisy plateau is rarely called an oscillation.
        ratio_mild: update/weight ratio median that corroborates. 5e-3: five times the
            healthy ~1e-3; converged small runs sat at 1e-3 to 3e-3 in our replays.
        ratio_strong: ratio median that makes it strong. 1e-2.
        min_level: with the loss's ``scale`` (its value at initialisation, the run's first
            point, as the analyzer passes it), the jitter band's median must be at least this
            fraction of it. 0.1: in bench/zoo a converged classifier (plain SGD on breast
            cancer, at its tuned LR) jittered at 4.5% of its first loss and a cut by 10 there
            cost 17-41% of its final loss, while a run stuck by an LR ten times too high bounces
            at 30-40% of its own (examples/mistuned.py: 0.75 against 2.32).
        min_fall: drop over ``window``, in jitter bands, that means "still falling". 1.0: in
            the labelled runs, still-improving healthy runs fell 1.7-40 bands over 400 steps,
            oscillating ones 0.0-0.9.
    """

    window: int = 400
    jitter_window: int = 100
    min_points: int = 100
    alpha: float = 0.05
    min_sign_changes: float = 0.55
    max_autocorr: float = -0.3
    excess_z: float = 2.33
    ratio_mild: float = 5e-3
    ratio_strong: float = 1e-2
    min_level: float = 0.1
    min_fall: float = 1.0

    def __post_init__(self) -> None:
        if not 10 <= self.min_points <= self.jitter_window <= self.window:
            raise ConfigError(
                f"oscillation needs 10 <= min_points <= jitter_window <= window, got "
                f"{self.min_points}, {self.jitter_window} and {self.window}"
            )
        if not 0 < self.alpha < 1 or not 0 <= self.min_sign_changes <= 1:
            raise ConfigError("oscillation.alpha must be in (0, 1), min_sign_changes in [0, 1]")
        if not -1 <= self.max_autocorr <= 1 or self.excess_z < 0:
            raise ConfigError("oscillation.max_autocorr must be in [-1, 1], excess_z >= 0")
        if not self.min_fall >= 0:
            raise ConfigError(f"oscillation.min_fall must be >= 0, got {self.min_fall}")
        if not 0 < self.ratio_mild <= self.ratio_strong:
            raise ConfigError(
                f"oscillation needs 0 < ratio_mild <= ratio_strong, got {self.ratio_mild} "
                f"and {self.ratio_strong}"
            )

    @quiet_numpy
    def check(
        self,
        steps: Steps,
        values: Values,
        *,
        tag: str,
        ratio: Window | None = None,
        scale: float | None = None,
    ) -> Finding | None:
        """Finding if the loss window is flat and jittering, corroborated; else None.

        ``ratio`` is the update/weight ratio series (e.g. ``lrwatch/update_ratio``); only its
        points inside the loss window's step range are used. ``scale``: the loss at
        initialisation (see ``min_level``); None skips that test.
        """
        s, v = as_window(steps, values)
        if v.size == 0 or not math.isfinite(float(v[-1])):
            return None
        s, v = finite_tail(s, v, self.window)
        long_s, long_v = s, v
        s, v = s[-self.jitter_window :], v[-self.jitter_window :]
        if v.size < self.min_points:
            return None
        # Corroboration first: it is cheap, and on a healthy run it is what fails.
        excess = _turning_z(np.diff(v)) >= self.excess_z
        ratio_med = _ratio_median(ratio, first=int(s[0]), last=int(s[-1]))
        strength = self._strength(excess, ratio_med)
        if strength is None:
            return None
        stats = _jitter_stats(s, v, min_points=self.min_points)
        if stats is None or stats["p_value"] < self.alpha:
            return None
        if scale is not None and scale > 0 and stats["level"] < self.min_level * scale:
            return None  # minibatch noise of a loss near its floor, not a bouncing LR
        if stats["sign_changes"] < self.min_sign_changes or stats["autocorr"] > self.max_autocorr:
            return None
        long_trend = kendall(long_s.astype(np.float64), long_v, alternative="less")
        if long_trend is None:
            return None
        fall = _fall_in_bands(long_v, band=stats["band"])
        high_ratio = ratio_med is not None and ratio_med >= self.ratio_strong
        if long_trend[1] < self.alpha and (fall >= self.min_fall or not high_ratio):
            return None  # still falling over the long window
        evidence = {
            **stats,
            "strength": strength,
            "mild": strength == "mild",
            "excess_alternation": excess,
            "ratio_median": ratio_med,
            "window": int(v.size),
            "long_tau": long_trend[0],
            "long_p_value": long_trend[1],
            "long_fall_bands": fall,
        }
        return Finding(
            schema.Kind.OSCILLATION,
            int(s[-1]),
            tag,
            schema.Severity.WARNING,
            evidence,
            _message(tag, int(s[-1]), evidence),
        )

    @quiet_numpy
    def could_fire(self, steps: Steps, values: Values, *, ratio_max: float | None) -> bool:
        """Batch twin of :meth:`check`: False only when ``check`` gives None on this window.

        Its cheap first test: no finding without corroboration, i.e. excess alternation or an
        update-ratio median of at least ``ratio_mild`` (``ratio_max``, an upper bound of that
        median, stands for it; None: no ratio series).
        """
        s, v = as_window(steps, values)
        if v.size == 0 or not math.isfinite(float(v[-1])):
            return False
        s, v = finite_tail(s, v, self.jitter_window)
        if v.size < self.min_points:
            return False
        if ratio_max is not None and ratio_max >= self.ratio_mild:
            return True
        return bool(_turning_z(np.diff(v)) >= self.excess_z - 1e-9)

    def _strength(self, excess: bool, ratio_med: float | None) -> Strength | None:
        r = -math.inf if ratio_med is None else ratio_med
        if r >= self.ratio_strong or (excess and r >= self.ratio_mild):
            return "strong"
        if excess or r >= self.ratio_mild:
            return "mild"
        return None


def _jitter_stats(s: Steps, v: Values, *, min_points: int) -> dict[str, Any] | None:
    """Trend and jitter statistics of a window, or None if it is too short or constant."""
    if v.size < min_points:
        return None
    trend = kendall(s.astype(np.float64), v)
    d = np.diff(v)
    r1, flips = lag1_autocorr(d), sign_change_fraction(d)
    if trend is None or r1 is None or flips is None:
        return None
    turns = int(np.sum((d[:-1] * d[1:]) < 0))
    turning_z = _turning_z(d)
    level = float(np.median(v))
    band = float(np.percentile(v, 90) - np.percentile(v, 10))
    return {
        "tau": trend[0],
        "p_value": trend[1],
        "sign_changes": flips,
        "autocorr": r1,
        "turning_points": turns,
        "turning_z": turning_z,
        "level": level,
        "band": band,
        "band_rel": band / abs(level) if level != 0 else math.inf,
    }


def _turning_z(d: Values) -> float:
    """Turning-point z of the series whose differences are ``d`` (``d.size + 1`` points)."""
    n = d.size + 1
    turns = int(np.sum((d[:-1] * d[1:]) < 0))
    return (turns - 2 * (n - 2) / 3) / math.sqrt((16 * n - 29) / 90)


def _fall_in_bands(v: Values, *, band: float) -> float:
    """Median of the first quarter minus median of the last quarter of ``v``, in bands."""
    q = max(v.size // 4, 1)
    fall = float(np.median(v[:q]) - np.median(v[-q:]))
    if band > 0:
        return fall / band
    return math.inf if fall > 0 else 0.0


def _ratio_median(ratio: Window | None, *, first: int, last: int) -> float | None:
    if ratio is None:
        return None
    s, v = as_window(*ratio)
    inside = (s >= first) & (s <= last) & np.isfinite(v)
    return float(np.median(v[inside])) if inside.any() else None


def _message(tag: str, step: int, ev: dict[str, Any]) -> str:
    ratio = "n/a" if ev["ratio_median"] is None else fmt(ev["ratio_median"])
    return (
        f"{tag} stopped falling and jitters ({ev['strength']}) at step {step}: band "
        f"{fmt(ev['band'])} around {fmt(ev['level'])} over {ev['window']} points, no trend "
        f"(tau {fmt(ev['tau'])}, p {fmt(ev['p_value'])}), {fmt(100 * ev['sign_changes'])}% sign "
        f"flips, lag-1 autocorrelation of differences {fmt(ev['autocorr'])}, update ratio {ratio}"
    )
