"""Overfit detector: the validation metric worsens while the training loss keeps improving.

Validation points are few (one per evaluation), so the rule counts evaluations, as
EarlyStopping does, and adds what EarlyStopping lacks to tell overfitting from noise:

1. the last ``patience`` evaluations are all worse than the best one by more than a margin
   (``min_delta_rel * |best| + min_delta_abs``; sign-safe, unlike a purely relative threshold);
2. validation is turning up since the best evaluation: Kendall's tau of the evaluations from the
   best one on, one-sided p < ``alpha`` (a lucky low evaluation in a noisy phase followed by a
   flat stretch is not overfitting; with ``patience`` 3 this needs the 4 points to rise
   monotonically, or more evaluations);
3. the training loss since the best evaluation is still falling (Kendall, one-sided p <
   ``alpha``) and is now below its level over the steps that led to the best evaluation.
``mode`` says whether the validation metric is a loss (``min``) or a score (``max``); the training
series is always a loss.

Example:
    >>> import numpy as np
    >>> val_steps = np.arange(0, 1000, 100)
    >>> val = np.array([2.0, 1.5, 1.2, 1.1, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5])
    >>> train_steps = np.arange(1000)
    >>> train = 2.0 * np.exp(-train_steps / 300)
    >>> f = OverfitDetector().check(val_steps, val, tag="val/loss", train=(train_steps, train))
    >>> f.evidence["best_step"], f.evidence["evals_worse"]
    (400, 5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    Steps,
    Values,
    Window,
    as_window,
    fmt,
    is_degenerate,
    kendall,
    quiet_numpy,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

# Sign that turns "better" into "smaller" for each mode, like EarlyStopping's mode_dict.
_SIGN = {"min": 1.0, "max": -1.0}


@dataclass(frozen=True)
class OverfitDetector:
    """Flag a validation metric that stays worse than its best while training improves.

    Args:
        mode: ``min`` for a validation loss, ``max`` for accuracy-like metrics.
        patience: evaluations in a row worse than the best. 3: one or two bad evaluations are
            common noise; three is a direction.
        min_delta_rel: relative part of the margin. 0.01: 1% of the best value.
        min_delta_abs: absolute part of the margin. 0.0: the relative part suffices unless the
            metric sits at 0; raise it for metrics near zero.
        alpha: one-sided significance for "training still improves". 0.05: the usual level.
        min_train_points: fewer training points since the best give no verdict. 8: Kendall's
            tau needs a handful of points to reach significance at all.
    """

    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta_rel: float = 0.01
    min_delta_abs: float = 0.0
    alpha: float = 0.05
    min_train_points: int = 8

    def __post_init__(self) -> None:
        if self.mode not in _SIGN:
            raise ConfigError(f"overfit.mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1 or self.min_train_points < 3:
            raise ConfigError(
                f"overfit needs patience >= 1 and min_train_points >= 3, got {self.patience} "
                f"and {self.min_train_points}"
            )
        if self.min_delta_rel < 0 or self.min_delta_abs < 0 or not 0 < self.alpha < 1:
            raise ConfigError("overfit needs min_delta_rel, min_delta_abs >= 0 and 0 < alpha < 1")

    @quiet_numpy
    def check(self, steps: Steps, values: Values, *, tag: str, train: Window) -> Finding | None:
        """Finding at the last evaluation if validation worsened while ``train`` fell."""
        s, v = as_window(steps, values)
        keep = np.isfinite(v)
        if v.size == 0 or not keep[-1]:
            return None
        s, v = s[keep], v[keep]
        signed = _SIGN[self.mode] * v
        best_i = int(np.argmin(signed))
        best = float(v[best_i])
        margin = self.min_delta_rel * abs(best) + self.min_delta_abs
        worse = signed[best_i + 1 :] > _SIGN[self.mode] * best + margin
        if worse.size < self.patience or not bool(np.all(worse[-self.patience :])):
            return None
        train_trend = self._train_trend(train, since=int(s[best_i]))
        if train_trend is None:
            return None
        # Overfitting means training goes *past* where it was when validation was best; a
        # training loss merely recovering from a blow-up after that point is not it.
        after = int(s[best_i - 1]) if best_i > 0 else None
        before = _median_between(train, after=after, upto=int(s[best_i]))
        if before is None or not train_trend[3] < before:
            return None
        # Worse than the best is not enough: a lucky low evaluation in a noisy or oscillating
        # phase stays "the best" while the run is fine. Validation must be turning up.
        rising = "greater" if self.mode == "min" else "less"
        val_trend = kendall(s[best_i:].astype(np.float64), v[best_i:], alternative=rising)
        if val_trend is None or not val_trend[1] < self.alpha:
            return None
        evidence = {
            "value": float(v[-1]),
            "best": best,
            "best_step": int(s[best_i]),
            "margin": margin,
            "evals_worse": int(worse.sum()),
            "evals_since_best": int(worse.size),
            "val_tau": val_trend[0],
            "val_p": val_trend[1],
            "train_tau": train_trend[0],
            "train_p": train_trend[1],
            "train_change": train_trend[2],
            "train_at_best": before,
            "train_now": train_trend[3],
            "mode": self.mode,
        }
        message = (
            f"{tag} = {fmt(float(v[-1]))} at step {int(s[-1])} has been worse than its best "
            f"{fmt(best)} (step {int(s[best_i])}) by more than {fmt(margin)} for "
            f"{self.patience}+ evaluations, while the training loss kept falling (tau "
            f"{fmt(train_trend[0])}, p {fmt(train_trend[1])}, change {fmt(train_trend[2])})"
        )
        return Finding(
            schema.Kind.OVERFIT, int(s[-1]), tag, schema.Severity.WARNING, evidence, message
        )

    def _train_trend(
        self, train: Window, *, since: int
    ) -> tuple[float, float, float, float] | None:
        """(tau, p, last-minus-first median, last median) of training loss since ``since``,
        if it falls."""
        s, v = as_window(*train)
        keep = (s >= since) & np.isfinite(v)
        s, v = s[keep], v[keep]
        if v.size < self.min_train_points or is_degenerate(v):
            return None
        trend = kendall(s.astype(np.float64), v, alternative="less")
        if trend is None or not trend[1] < self.alpha:
            return None
        q = max(v.size // 4, 1)
        now = float(np.median(v[-q:]))
        change = now - float(np.median(v[:q]))
        return (trend[0], trend[1], change, now) if math.isfinite(change) else None


def _median_between(train: Window, *, after: int | None, upto: int) -> float | None:
    """Median training loss over the steps that led to an evaluation (``after`` < s <= ``upto``).

    None without such points, e.g. a best evaluation taken before the first step: a run whose
    validation never beat its untrained value has not overfitted, it has not learned.
    """
    s, v = as_window(*train)
    keep = (s <= upto) & np.isfinite(v) if after is None else (s > after) & (s <= upto)
    v = v[keep & np.isfinite(v)]
    return float(np.median(v)) if v.size else None
