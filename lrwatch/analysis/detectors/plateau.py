"""Plateau detectors: a best-so-far tracker for evaluation metrics, a trend test for noisy loss.

:class:`PlateauTracker` is stateful and shaped like ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
With ``semantics="torch"`` it takes exactly torch's decisions (a differential test holds it to
that). Its default, ``semantics="lrwatch"``, fixes three known traps:

1. ``patience`` means what Keras, Lightning and Hugging Face mean: the plateau fires on the
   ``patience``-th bad check in a row (torch fires on the ``patience + 1``-th).
2. The relative threshold is relative to ``|best|``, so it also works for metrics below zero.
   Torch's bar ``best * (1 - threshold)`` lies *above* a negative best: a slightly worse value
   counts as an improvement and a flat negative metric never plateaus (pytorch#47513).
3. A recovery after a spike is not a plateau (pytorch#30873): a check that beats the best of the
   previous ``patience - 1`` checks resets the bad count even while it is above the all-time
   best. The spike leaves that window before patience runs out, so a steady recovery never
   fires. On a flat, noisy metric a new low of that window is rare: the rule costs one or two
   checks on average against torch at equal effective patience (300 noisy plateaus, patience
   3 / 5 / 10: 7.0 / 10.4 / 19.2 checks against torch's 5.2 / 8.6 / 17.0).

   Non-finite values are skipped there (the non-finite detector owns them); torch counts
   them as bad checks.

:class:`PlateauTrend` is for raw per-step training loss, too noisy for a best-so-far rule: no
significant downward trend (Kendall's tau, one-sided) and a Theil-Sen slope whose projected
improvement over the window is below ``min_improvement``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import as_window, fmt, is_degenerate, kendall
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

logger = logging.getLogger(__name__)

Mode = Literal["min", "max"]
ThresholdMode = Literal["rel", "abs"]
Semantics = Literal["lrwatch", "torch"]
_MAX_TREND_POINTS = 128  # Theil-Sen is quadratic in this; 128 keeps it under a millisecond


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {allowed}")


class PlateauTracker:
    """Best-so-far plateau rule for a metric checked now and then (validation loss, accuracy).

    Args:
        mode: "min" for losses, "max" for accuracies.
        patience: bad checks in a row that make a plateau (torch semantics: one more). 5:
            torch's 10 epochs is long for a run evaluated every few hundred steps; Lightning's
            EarlyStopping uses 3.
        threshold: smallest improvement that counts. 1e-3: below 0.1% is evaluation noise.
        threshold_mode: "rel" (a fraction of the best; of ``|best|`` in lrwatch semantics)
            or "abs" (in metric units).
        cooldown: checks ignored after a plateau. 0: the policy's cooldown (in steps) rules.
        factor: torch's LR multiplier, used only when ``lr`` is tracked. 0.5.
        min_lr, eps: torch's floor and smallest LR change, used only when ``lr`` is tracked.
        lr: an LR to follow the way ReduceLROnPlateau would change it (for the torch
            comparison and for "what would torch have done"); None to track no LR.
        semantics: "lrwatch" (the fixes in the module docstring) or "torch" (exactly torch).
            It switches the rules, not the defaults: to replay a torch configuration, also pass
            torch's values (patience=10, threshold=1e-4, factor=0.1).

    Example:
        >>> t = PlateauTracker(patience=2)
        >>> [t.update(s, v, tag="val/loss") is not None for s, v in enumerate([3, 2, 2, 2])]
        [False, False, False, True]
    """

    def __init__(
        self,
        *,
        mode: Mode = "min",
        patience: int = 5,
        threshold: float = 1e-3,
        threshold_mode: ThresholdMode = "rel",
        cooldown: int = 0,
        factor: float = 0.5,
        min_lr: float = 0.0,
        eps: float = 1e-8,
        lr: float | None = None,
        semantics: Semantics = "lrwatch",
    ) -> None:
        _choice("mode", mode, ("min", "max"))
        _choice("threshold_mode", threshold_mode, ("rel", "abs"))
        _choice("semantics", semantics, ("lrwatch", "torch"))
        least = 1 if semantics == "lrwatch" else 0
        if not isinstance(patience, int) or patience < least:
            raise ConfigError(f"patience={patience!r}: use an integer >= {least} ({semantics})")
        if not (isinstance(cooldown, int) and cooldown >= 0):
            raise ConfigError(f"cooldown={cooldown!r}: use an integer >= 0 (checks)")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ConfigError(f"threshold={threshold!r}: use a finite number >= 0")
        if not 0.0 <= factor < 1.0:
            raise ConfigError(f"factor={factor!r}: use a multiplier in [0, 1), e.g. 0.5")
        if min_lr < 0 or eps < 0 or (lr is not None and not lr >= 0):
            raise ConfigError("min_lr, eps and lr must be >= 0")
        self.mode, self.patience, self.threshold = mode, patience, threshold
        self.threshold_mode, self.cooldown, self.semantics = threshold_mode, cooldown, semantics
        self.factor, self.min_lr, self.eps = factor, min_lr, eps
        # State, the counters named as in ReduceLROnPlateau.
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_checks = 0
        self.cooldown_counter = 0
        self.num_checks = 0
        self.lr = lr
        self.recent: deque[float] = deque(maxlen=max(patience - 1, 0))

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def update(self, step: int, value: float, *, tag: str) -> Finding | None:
        """Feed one check; a Finding when it completes a plateau (the counters then reset)."""
        value = float(value)
        torch_like = self.semantics == "torch"
        if not torch_like and not math.isfinite(value):
            return None
        self.num_checks += 1
        if self._beats(value, self.best):
            self.best, self.num_bad_checks = value, 0
        elif not torch_like and self.recent and self._beats(value, self._recent_best()):
            self.num_bad_checks = 0  # still recovering from a spike: not a plateau
        else:
            self.num_bad_checks += 1
        self.recent.append(value)
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_checks = 0
        limit = self.patience + 1 if torch_like else self.patience
        if self.num_bad_checks < limit:
            return None
        bad = self.num_bad_checks
        lr_before = self._reduce_lr()
        self.cooldown_counter, self.num_bad_checks = self.cooldown, 0
        return self._finding(step, value, bad, lr_before, tag=tag)

    def _beats(self, value: float, ref: float) -> bool:
        """Whether ``value`` improves on ``ref`` by the threshold (NaN never does)."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.threshold_mode == "abs":
            bar = ref + sign * self.threshold
        elif self.semantics == "torch":
            bar = ref * (1.0 + sign * self.threshold)  # torch's bar, wrong below zero
        else:
            bar = ref + sign * self.threshold * abs(ref) if math.isfinite(ref) else ref
        return value > bar if self.mode == "max" else value < bar

    def _recent_best(self) -> float:
        return max(self.recent) if self.mode == "max" else min(self.recent)

    def _reduce_lr(self) -> float | None:
        """Follow torch's LR update: floor at min_lr, ignore changes not above eps."""
        old = self.lr
        if old is not None:
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.lr = new
        return old

    def _finding(
        self, step: int, value: float, bad: int, lr_before: float | None, *, tag: str
    ) -> Finding:
        evidence: dict[str, Any] = {
            "rule": "best",
            "semantics": self.semantics,
            "value": value,
            "best": self.best,
            "num_bad_checks": bad,
            "patience": self.patience,
            "threshold": self.threshold,
            "threshold_mode": self.threshold_mode,
            "checks": self.num_checks,
        }
        if lr_before is not None:
            evidence.update(lr=lr_before, new_lr=self.lr)
        word = "rise" if self.mode == "max" else "drop"
        message = (
            f"no {word} beyond {fmt(self.threshold)} ({self.threshold_mode}) on the best "
            f"{fmt(self.best)} for {bad} checks (patience {self.patience}); now {fmt(value)}"
        )
        return Finding(schema.Kind.PLATEAU, step, tag, schema.Severity.INFO, evidence, message)

    def state_dict(self) -> dict[str, Any]:
        """The counters only (settings come from the constructor); strict-JSON safe."""
        return {
            "best": _float_out(self.best),
            "num_bad_checks": self.num_bad_checks,
            "cooldown_counter": self.cooldown_counter,
            "num_checks": self.num_checks,
            "lr": None if self.lr is None else _float_out(self.lr),
            "recent": [_float_out(v) for v in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.num_bad_checks = int(state["num_bad_checks"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.num_checks = int(state["num_checks"])
        self.lr = None if state["lr"] is None else float(state["lr"])
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.recent.maxlen)


def _float_out(x: float) -> float | str:
    """JSON has no Inf/NaN: spell them as strings that ``float()`` reads back."""
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class PlateauTrend:
    """No significant improvement of a noisy per-step series over its last ``window`` points.

    A plateau needs both: Kendall's tau of value against step shows no significant move in the
    good direction (one-sided p-value >= ``alpha``), and the Theil-Sen slope, projected over the
    window, improves the median value by less than ``min_improvement`` (relative). The first
    alone would call a noisy but real descent on few points a plateau; the second alone would
    call slow, real progress (a long pre-training run) a plateau.

    Windows longer than 128 points are reduced to block means first: that bounds the quadratic
    Theil-Sen cost and, unlike a strided subsample, keeps the trend's significance. A check
    still ranks a whole window (a fraction of a millisecond), so evaluate it every
    ``window // 4`` points or so, not at every point.

    Args:
        mode: "min" for losses, "max" for accuracies.
        window: points (steps when the loss is logged every step). 1000: at 1% per-step noise
            a real 0.5% gain per 1000 points is significant (z ~ 4.5), so slow, healthy progress
            is not called a plateau; at 500 points it is not (z ~ 1.6).
        alpha: significance level of the trend test. 0.05.
        min_improvement: relative improvement over the window that still counts as progress.
            0.01: a loss that loses less than 1% per window is not worth the full LR.
        min_points: fewer finite points give no verdict. 20.
    """

    mode: Mode = "min"
    window: int = 1000
    alpha: float = 0.05
    min_improvement: float = 0.01
    min_points: int = 20

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("min", "max"))
        if not 3 <= self.min_points <= self.window:
            raise ConfigError("PlateauTrend needs 3 <= min_points <= window (points)")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha={self.alpha!r}: use a significance level in (0, 1)")
        if not (math.isfinite(self.min_improvement) and self.min_improvement >= 0):
            raise ConfigError(f"min_improvement={self.min_improvement!r}: use a number >= 0")

    def check(self, steps: Any, values: Any, *, tag: str) -> Finding | None:
        """A plateau Finding at the last point, or None (no plateau, or no verdict possible)."""
        s, v = as_window(steps, values)
        if v.size == 0 or not math.isfinite(v[-1]):
            return None  # the non-finite detector speaks for this step
        keep = np.isfinite(v)
        s, v = s[keep][-self.window :], v[keep][-self.window :]
        if is_degenerate(v, min_points=self.min_points) or is_degenerate(s.astype(np.float64)):
            return None
        ev = self._trend(s, v)
        if ev is None or ev["p_value"] < self.alpha or ev["improvement"] >= self.min_improvement:
            return None
        message = (
            f"no significant trend over the last {v.size} points (Kendall tau {ev['tau']:+.3f}, "
            f"p={ev['p_value']:.3g} >= {self.alpha}); Theil-Sen projects "
            f"{ev['improvement']:+.2%} improvement, below {self.min_improvement:.2%}; "
            f"median {fmt(ev['median'])}"
        )
        return Finding(schema.Kind.PLATEAU, int(s[-1]), tag, schema.Severity.INFO, ev, message)

    def _trend(self, s: Any, v: Any) -> dict[str, Any] | None:
        """The evidence: rank trend, robust slope and the improvement it projects, or None."""
        x, y = _block_means(s.astype(np.float64), v)
        tau_p = kendall(x, y, alternative="greater" if self.mode == "max" else "less")
        slope = _theil_sen(x, y)
        if tau_p is None or slope is None:
            return None
        gain = 1.0 if self.mode == "max" else -1.0  # the sign of a good move
        median = float(np.median(v))
        projected = gain * slope * float(s[-1] - s[0])
        return {
            "rule": "trend",
            "window": self.window,
            "points": int(v.size),
            "blocks": int(y.size),
            "tau": tau_p[0],
            "p_value": tau_p[1],
            "alpha": self.alpha,
            "slope": slope,
            "improvement": projected / max(abs(median), np.finfo(np.float64).tiny),
            "min_improvement": self.min_improvement,
            "median": median,
            "best": float(v.max() if self.mode == "max" else v.min()),
        }


def _block_means(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """At most ``_MAX_TREND_POINTS`` means of equal consecutive blocks, the newest points kept."""
    k = -(-y.size // _MAX_TREND_POINTS)
    if k == 1:
        return x, y
    n = y.size // k * k
    return x[-n:].reshape(-1, k).mean(axis=1), y[-n:].reshape(-1, k).mean(axis=1)


def _theil_sen(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> float | None:
    """Median of pairwise slopes (robust to the outliers of per-step loss), None if undefined.

    Written out because scipy's ``theilslopes`` also computes confidence bounds, 4x the cost.
    Pairs at the same step (a restarted trainer logs a step twice) have no slope and are skipped.
    """
    i, j = np.triu_indices(x.size, 1)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        return None
    slope = float(np.median((y[j][keep] - y[i][keep]) / dx[keep]))
    return slope if math.isfinite(slope) else None
