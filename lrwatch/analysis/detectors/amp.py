"""Mixed-precision detector: tell GradScaler's normal overflows from real trouble.

GradScaler multiplies the loss by a scale, skips the step and halves the scale whenever the
scaled gradients overflow, and doubles it after a run of clean steps. An isolated back-off with a
skipped step is therefore normal and yields nothing here. These are not normal, checked in this
order at the current step (the latest step of any series given):

================  =====================================================  ==========  ========
``amp`` evidence  rule                                                   kind        severity
================  =====================================================  ==========  ========
nonfinite_loss    the loss itself is NaN/Inf: no unscaling explains it   nonfinite   critical
scale_collapse    the scale fell below ``min_scale``                     explosion   critical
skipping          ``>= max_skip_fraction`` of the last ``window`` steps  nonfinite   warning
                  skipped (critical from one half)
repeated_backoff  ``max_backoffs`` halvings in ``window`` steps with no  explosion   warning
                  growth in between, after ``startup_steps``
================  =====================================================  ==========  ========

Example:
    >>> import numpy as np
    >>> steps = np.arange(300, 310)
    >>> scale = 65536.0 / 2.0 ** np.r_[0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    >>> f = AmpDetector().check(scale=(steps, scale))
    >>> f.kind.value, f.evidence["amp"], f.evidence["backoffs"]
    ('explosion', 'repeated_backoff', 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import Steps, Values, Window, as_window, fmt, quiet_numpy
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

_Rule = tuple[schema.Kind, schema.Severity, dict[str, Any], str]
"""What a rule found: kind, severity, evidence (``amp`` names the rule) and a phrase."""
_EMPTY: Window = (np.zeros(0, np.int64), np.zeros(0, np.float64))


@dataclass(frozen=True)
class AmpDetector:
    """Flag persistent skipping, a collapsing loss scale or a non-finite loss under AMP.

    Args:
        min_scale: a scale below this has collapsed. 1.0: below 1 the scaler shrinks the
            gradients, so they overflow even unscaled; fp16 training cannot recover there.
        max_backoffs: halvings without growth that count as repeated. 4: a settled scaler
            backs off about once per growth attempt; 16x down in a short span is not that.
        max_skip_fraction: skipped-step fraction that counts as persistent. 0.2: one step in
            five thrown away is a fifth of the compute and means the gradients keep overflowing.
        window: steps examined for skips and back-offs. 100: long enough for a fraction to mean
            something, short enough to react within a few logging intervals.
        startup_steps: back-offs before this step are GradScaler searching for its scale
            (it starts at 65536, usually too high). 200: the search takes a handful of steps.
    """

    min_scale: float = 1.0
    max_backoffs: int = 4
    max_skip_fraction: float = 0.2
    window: int = 100
    startup_steps: int = 200

    def __post_init__(self) -> None:
        if not self.min_scale > 0 or self.max_backoffs < 2:
            raise ConfigError(
                f"amp needs min_scale > 0 and max_backoffs >= 2, got {self.min_scale} and "
                f"{self.max_backoffs}; one back-off is GradScaler's normal behaviour"
            )
        if not 0 < self.max_skip_fraction < 1 or self.window < 10 or self.startup_steps < 0:
            raise ConfigError(
                "amp needs 0 < max_skip_fraction < 1, window >= 10 and startup_steps >= 0"
            )

    @quiet_numpy
    def check(
        self,
        *,
        scale: Window | None,
        skipped: Window | None = None,
        loss: Window | None = None,
        tag: str = schema.LOSS_SCALE,
    ) -> Finding | None:
        """Finding about the loss ``scale`` series, skip flags and loss, else None.

        Every series is optional (``None`` or empty when the run did not log it): a run with a
        scaler logs ``lrwatch.diagnostics/loss_scale`` and ``lrwatch.diagnostics/skipped_step``
        (1.0 on skipped steps;
        zeros may or may not be written, both work).
        """
        s, v = as_window(*scale) if scale is not None else _EMPTY
        sk = as_window(*skipped) if skipped is not None else None
        lo = as_window(*loss) if loss is not None else None
        present = [w[0] for w in ((s, v), sk, lo) if w is not None and w[0].size]
        if not present:
            return None
        now, first = int(max(x[-1] for x in present)), int(min(x[0] for x in present))
        rule = (
            _nonfinite_loss(lo)
            or self._collapse(v)
            or self._skipping(sk, now=now, first=first)
            or self._backoffs(s, v, now=now)
        )
        if rule is None:
            return None
        kind, severity, evidence, what = rule
        message = f"mixed precision: {what} at step {now}"
        return Finding(kind, now, tag, severity, evidence, message)

    def _collapse(self, v: Values) -> _Rule | None:
        if v.size == 0 or not math.isfinite(float(v[-1])) or v[-1] >= self.min_scale:
            return None
        ev = {"amp": "scale_collapse", "scale": float(v[-1]), "min_scale": self.min_scale}
        what = f"loss scale {fmt(float(v[-1]))} fell below {fmt(self.min_scale)}"
        return schema.Kind.EXPLOSION, schema.Severity.CRITICAL, ev, what

    def _skipping(self, sk: Window | None, *, now: int, first: int) -> _Rule | None:
        covered = now - first + 1
        if sk is None or covered < self.window:
            return None  # too little history to call a fraction persistent
        s, v = sk
        inside = s > now - self.window
        count = int(np.sum((v[inside] > 0.5) | ~np.isfinite(v[inside])))
        frac = count / self.window
        if frac < self.max_skip_fraction:
            return None
        severity = schema.Severity.CRITICAL if frac >= 0.5 else schema.Severity.WARNING
        ev = {"amp": "skipping", "skipped": count, "window": self.window, "skip_fraction": frac}
        what = f"{count} of the last {self.window} steps skipped ({fmt(100 * frac)}%)"
        return schema.Kind.NONFINITE, severity, ev, what

    def _backoffs(self, s: Steps, v: Values, *, now: int) -> _Rule | None:
        keep = np.isfinite(v) & (v > 0)
        s, v = s[keep], v[keep]
        if v.size < 2:
            return None
        # Halvings, not logged changes: at a sparse logging cadence one logged drop of 8x is
        # three back-offs.
        halvings = -np.diff(np.log2(v))
        at = s[1:]
        grew = np.flatnonzero(halvings < 0)
        after = at > (at[grew[-1]] if grew.size else np.iinfo(np.int64).min)
        counted = after & (halvings > 0) & (at > now - self.window) & (at >= self.startup_steps)
        n = int(round(float(halvings[counted].sum())))
        if n < self.max_backoffs:
            return None
        before = float(v[np.flatnonzero(counted)[0]])
        ev = {
            "amp": "repeated_backoff",
            "backoffs": n,
            "scale": float(v[-1]),
            "scale_before": before,
            "window": self.window,
        }
        what = (
            f"loss scale halved {n} times without growth within {self.window} steps "
            f"({fmt(before)} -> {fmt(float(v[-1]))})"
        )
        return schema.Kind.EXPLOSION, schema.Severity.WARNING, ev, what


def _nonfinite_loss(lo: Window | None) -> _Rule | None:
    if lo is None or lo[1].size == 0 or math.isfinite(float(lo[1][-1])):
        return None
    value = float(lo[1][-1])
    ev = {"amp": "nonfinite_loss", "value": str(value), "loss_step": int(lo[0][-1])}
    what = f"the loss itself is {value} (not an overflow that unscaling and skipping absorb)"
    return schema.Kind.NONFINITE, schema.Severity.CRITICAL, ev, what
