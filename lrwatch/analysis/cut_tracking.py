"""Did the analyzer's last LR cut take effect? Read from the run's own data.

One question with its own evidence (the hook's acknowledgement, the logged LR) and its own
consequence: conditions that say "this LR is wrong" are judged anew on points logged after an
applied cut, and are held while the logged LR shows that the last cut was never applied (a
replay, or a daemon giving advice only). The data then still shows the old LR, so it is no
evidence about the new one, and cutting again every cooldown would only burn the budget: the cut
already decided is the answer to them. Non-finite values still count (them persisting after cuts
is what stops a run), and overfitting is not about the LR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lrwatch import schema
from lrwatch.schema import Kind, Scalar

LR_KINDS = frozenset({Kind.RATIO_HIGH, Kind.OSCILLATION, Kind.PLATEAU})
HELD_WHEN_UNAPPLIED = LR_KINDS | {Kind.EXPLOSION}


@dataclass
class LastCut:
    """The last LR cut the analyzer decided: when, at which logged LR, by how much."""

    step: int
    lr: float | None
    factor: int

    def unapplied(self, *, advice_only: bool, ack: Scalar | None, lr: Scalar | None) -> bool:
        """Whether the run's data shows that this cut never took effect.

        A run no hook of lrwatch writes (``advice_only``) cannot apply anything. The hook's own
        acknowledgement (``ack``, the last ``lrwatch_control/lr_factor`` point, logged after the
        cut)
        means applied. Otherwise the logged LR (``lr``, its last point) must have fallen by at
        least the square root of the factor (midway, in log terms) once a point after the cut
        exists; without an LR tag, or before that point, assume applied.
        """
        if advice_only:
            return True
        if ack is not None and ack.step >= self.step and ack.value > 1.0:
            return False
        if self.lr is None or lr is None or lr.step <= self.step:
            return False
        return lr.value > self.lr / math.sqrt(self.factor)

    def state(self) -> list[Any]:
        return [self.step, None if self.lr is None else schema.json_number(self.lr), self.factor]

    @classmethod
    def from_state(cls, state: list[Any] | None) -> LastCut | None:
        if state is None:
            return None
        step, lr, factor = state
        return cls(int(step), None if lr is None else float(lr), int(factor))
