"""Non-finite detector: NaN/Inf in the loss or a gradient norm, at the step it occurs.

Run it on ``lrwatch/loss``, ``lrwatch/grad_norm`` and the ``lrwatch.diagnostics/nonfinite`` flag
(1.0 when the
loss or any gradient was NaN/Inf, recorded even between logging steps). It is checked before any
other detector, as EarlyStopping checks finiteness before it compares with the best value.

Example:
    >>> import numpy as np
    >>> f = NonfiniteDetector().check(np.array([1, 2]), np.array([2.3, np.nan]), tag="lrwatch/loss")
    >>> f.kind.value, f.severity.value, f.evidence["consecutive"]
    ('nonfinite', 'critical', 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    Steps,
    Values,
    Window,
    as_window,
    quiet_numpy,
    trailing_run,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

# Tags whose non-finite values GradScaler produces by design when it overflows and skips the
# step: on a skipped step these belong to the AMP detector, not to this one. The loss is never
# on this list: a NaN loss is not an unscaling artefact.
_SCALER_OVERFLOW_TAGS = (schema.NONFINITE, schema.GRAD_NORM, schema.GRAD_NORM_PRECLIP)


@dataclass(frozen=True)
class NonfiniteDetector:
    """Flag a NaN/Inf value (or a set ``lrwatch.diagnostics/nonfinite`` flag) at the last point.

    Args:
        flag_threshold: the flag tag counts as set above this value. Default 0.5: the hook
            writes exactly 0.0 or 1.0, so half-way is immune to float round-off.
    """

    flag_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.flag_threshold < 1.0:
            raise ConfigError(
                f"nonfinite.flag_threshold must be in (0, 1), got {self.flag_threshold}; "
                "the flag is 0.0 or 1.0, keep the default 0.5"
            )

    @quiet_numpy
    def check(
        self,
        steps: Steps,
        values: Values,
        *,
        tag: str,
        skipped: Window | None = None,
    ) -> Finding | None:
        """Critical finding if the last point is non-finite (or the flag is set), else None.

        ``skipped`` is the ``lrwatch.diagnostics/skipped_step`` series: a gradient overflow on a
        step that
        GradScaler skipped is normal mixed-precision behaviour and is left to the AMP detector.
        """
        s, v = as_window(steps, values)
        if s.size == 0:
            return None
        bad = self._bad(v, tag)
        if not bad[-1] or (tag in _SCALER_OVERFLOW_TAGS and _was_skipped(int(s[-1]), skipped)):
            return None
        run = trailing_run(bad)
        last = float(v[-1])
        evidence = {
            "value": str(last) if tag != schema.NONFINITE else last,
            "consecutive": run,
            "first_step": int(s[-run]),
            "in_window": int(bad.sum()),
            "window": int(s.size),
        }
        what = "set" if tag == schema.NONFINITE else f"{last}"
        message = (
            f"{tag} is {what} at step {int(s[-1])}"
            f" ({run} logged point(s) in a row since step {int(s[-run])}, "
            f"{int(bad.sum())} of the last {s.size})"
        )
        return Finding(
            kind=schema.Kind.NONFINITE,
            step=int(s[-1]),
            tag=tag,
            severity=schema.Severity.CRITICAL,
            evidence=evidence,
            message=message,
        )

    def could_fire_many(self, values: Values, *, tag: str) -> NDArray[np.bool_]:
        """Batch twin of :meth:`check`: the points that could make a finding (False: None)."""
        return self._bad(np.asarray(values, dtype=np.float64), tag)

    def _bad(self, v: Values, tag: str) -> NDArray[np.bool_]:
        if tag == schema.NONFINITE:
            # A non-finite flag value is itself a sign that something went wrong.
            return np.asarray(~np.isfinite(v) | (v > self.flag_threshold))
        return np.asarray(~np.isfinite(v))


def _was_skipped(step: int, skipped: Window | None) -> bool:
    if skipped is None:
        return False
    s, v = as_window(*skipped)
    return bool(np.any((s == step) & (v > 0.5)))
