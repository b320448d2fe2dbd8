"""Schedule awareness: which phase the logged learning rate is in at the current step.

Not a finding: the policy reads the phase to stay out of the schedule's way (no plateau cut
during warm-up, none right after the schedule itself cut or while it is already decaying).
Rules over the last ``window`` finite LR points, first match wins:

========  ================================================================================
phase     rule
========  ================================================================================
unknown   fewer than 2 points (or the last LR is not finite)
cut       one logged interval dropped the LR by ``>= min_cut`` within the window, and the
          LR has stayed within ``rel_tol`` of its post-drop value since
warmup    the LR rose by more than ``rel_tol`` across the window
decaying  the LR fell by more than ``rel_tol`` across the window (a smooth schedule)
constant  otherwise
========  ================================================================================

The logged ``lrwatch/lr`` is the effective LR, so an lrwatch cut shows up as ``cut`` too.

Example:
    >>> import numpy as np
    >>> steps = np.arange(50)
    >>> ScheduleDetector().check(steps, 1e-3 * np.minimum(1.0, (steps + 1) / 100)).phase
    'warmup'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lrwatch import schema
from lrwatch.analysis.detectors._window import Steps, Values, as_window, finite_tail, quiet_numpy
from lrwatch.errors import ConfigError

Phase = Literal["unknown", "warmup", "constant", "decaying", "cut"]


@dataclass(frozen=True)
class SchedulePhase:
    """The LR schedule's phase at ``step``, with the numbers that decided it."""

    phase: Phase
    step: int
    tag: str = schema.LR
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleDetector:
    """Classify the LR schedule's phase at the last logged point.

    Args:
        window: LR points examined. 20: at per-step logging a warm-up or a decay moves the LR
            measurably in 20 steps, and a cut stays "recent" for 20 logged points.
        rel_tol: relative change below which the LR counts as unchanged. 1e-3: float noise and
            printing round-off stay below it, while a cosine decay over 10k steps moves the LR
            by more than that in 20 steps except at its flat ends.
        min_cut: drop in one logged interval that is a step cut. 0.2: StepLR and
            ReduceLROnPlateau cut by 2x-10x, whereas smooth schedules move a few percent per
            logged point.
    """

    window: int = 20
    rel_tol: float = 1e-3
    min_cut: float = 0.2

    def __post_init__(self) -> None:
        if self.window < 2 or not 0 <= self.rel_tol < self.min_cut < 1:
            raise ConfigError(
                f"schedule needs window >= 2 and 0 <= rel_tol < min_cut < 1, got window="
                f"{self.window} rel_tol={self.rel_tol} min_cut={self.min_cut}"
            )

    @quiet_numpy
    def check(self, steps: Steps, values: Values, *, tag: str = schema.LR) -> SchedulePhase:
        """The phase at the last point (``unknown`` when it cannot be told)."""
        s, v = as_window(steps, values)
        step = int(s[-1]) if s.size else -1
        if v.size == 0 or not math.isfinite(float(v[-1])):
            return SchedulePhase("unknown", step, tag, {"points": int(v.size)})
        s, v = finite_tail(s, v, self.window)
        if v.size < 2:
            return SchedulePhase("unknown", step, tag, {"points": int(v.size)})
        lr, first = float(v[-1]), float(v[0])
        change = (lr - first) / abs(first) if first != 0 else (math.inf if lr > 0 else 0.0)
        evidence: dict[str, Any] = {"lr": lr, "lr_first": first, "change": change}
        evidence["points"] = int(v.size)
        cut_at = self._last_cut(v)
        if cut_at is not None:
            drop = 1.0 - float(v[cut_at]) / float(v[cut_at - 1])
            evidence.update(cut_step=int(s[cut_at]), drop=drop)
            return SchedulePhase("cut", step, tag, evidence)
        if change > self.rel_tol:
            return SchedulePhase("warmup", step, tag, evidence)
        if change < -self.rel_tol:
            return SchedulePhase("decaying", step, tag, evidence)
        return SchedulePhase("constant", step, tag, evidence)

    def _last_cut(self, v: Values) -> int | None:
        """Index of the last step drop, if the LR has held still after it."""
        prev, nxt = v[:-1], v[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            drops = (prev > 0) & (nxt <= (1.0 - self.min_cut) * prev)
        idx = np.flatnonzero(drops)
        if idx.size == 0:
            return None
        at = int(idx[-1]) + 1
        after = v[at:]
        held = np.all(np.abs(after - v[at]) <= self.rel_tol * abs(float(v[at])) + 1e-300)
        return at if bool(held) else None


@quiet_numpy
def steps_to_next_cut(
    steps: Steps, values: Values, *, ignore: Steps, min_cut: float = 0.2
) -> tuple[int, int] | None:
    """(steps until the schedule's next step cut, its period), predicted from its past ones.

    A StepLR or MultiStep-like schedule that cut at steps 150 and 300 cuts again near 450; one
    that cut once, at 150, is taken to cut every 150 steps. Drops at the ``ignore`` steps (where
    lrwatch's own cuts were applied, give or take one step) are not the schedule's. None when
    the LR history shows no step cut of the schedule, or when the prediction is already past.
    """
    s, v = as_window(steps, values)
    keep = np.isfinite(v)
    s, v = s[keep], v[keep]
    if v.size < 3:
        return None
    drops = np.flatnonzero((v[:-1] > 0) & (v[1:] <= (1.0 - min_cut) * v[:-1])) + 1
    ours = np.asarray(ignore, dtype=np.int64)
    at = [int(s[i]) for i in drops if not np.any(np.abs(ours - s[i]) <= 1)]
    if not at:
        return None
    period = at[-1] - at[-2] if len(at) >= 2 else at[-1] - int(s[0])
    left = at[-1] + period - int(s[-1])
    return (left, period) if period > 0 and left > 0 else None
