"""Counting the steps a ``torch.amp.GradScaler`` skipped, from its scale alone.

A skipped step never calls ``optimizer.step()``, so no optimizer hook sees it. What does change is
the scaler's state: ``update()`` after a skip multiplies the scale by ``backoff_factor`` and
resets the growth tracker, while after a real step the scale is kept or, every
``growth_interval`` good steps, multiplied by ``growth_factor``. Knowing the state at the previous
real step and whether that step's update grew the scale, the number of skips since is the exact
power of ``backoff_factor`` between the scales.

Reading the scale is a 4-byte read per step. On CPU it is free; on CUDA ``GradScaler.step`` has
just synchronised on its own inf check (``found_inf.item()``) before calling ``optimizer.step()``,
so the read waits for no queued work.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)


class SkipCounter:
    """Tracks a GradScaler across optimizer steps.

    Call :meth:`at_step` from the step pre-hook of every real step and :meth:`at_end` once when
    monitoring ends; both return the scales in effect during the iterations skipped since.
    """

    def __init__(self, scaler: Any) -> None:
        self._scaler = scaler
        self._growth = float(scaler.get_growth_factor())
        self._backoff = float(scaler.get_backoff_factor())
        self._interval = int(scaler.get_growth_interval())
        self.rebase()

    def rebase(self) -> None:
        """Take the scaler's current state as the reference (at start, or after a resume)."""
        self._scale, self._tracker = self._read()
        self._stepped = False  # a real step whose update() has not been seen yet

    @property
    def scale(self) -> float:
        """The scale in effect at the last call."""
        return self._scale

    def at_step(self) -> list[float]:
        """At a real step's pre-hook: the scales of the iterations skipped before it."""
        skipped = self._skipped_since()
        self._stepped = True
        return skipped

    def at_end(self) -> list[float]:
        """When monitoring ends: the scales of the iterations skipped after the last real step."""
        skipped = self._skipped_since()
        self._stepped = False
        return skipped

    def _skipped_since(self) -> list[float]:
        scale, tracker = self._read()
        base = self._scale
        if self._stepped and self._tracker + 1 >= self._interval:
            base *= self._growth  # the update after that step grew the scale
        skips = 0
        if tracker == 0 and 0 < scale < base:
            skips = max(0, round(math.log(scale / base) / math.log(self._backoff)))
        self._scale, self._tracker = scale, tracker
        return [base * self._backoff**i for i in range(skips)]

    def _read(self) -> tuple[float, int]:
        s = self._scaler
        scale = s._scale if s._scale is not None else s._init_scale
        tracker = s._growth_tracker if s._growth_tracker is not None else s._init_growth_tracker
        return float(scale), int(tracker)


def skip_counter(scaler: Any) -> SkipCounter | None:
    """A counter for an enabled ``scaler``; None without one, or (with a warning) if unreadable."""
    if scaler is None or not scaler.is_enabled():
        return None
    try:
        return SkipCounter(scaler)
    except Exception as exc:  # a scaler we cannot read: log the rest, not the skips
        logger.warning("lrwatch cannot read this GradScaler (%r): skipped steps not recorded", exc)
        return None
