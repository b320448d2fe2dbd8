"""Which best-weights copy the hook holds, so that a stop can end the run on it.

The hook writes ``lrwatch_control/kept_best`` (the validation loss) at each step whose weights
it copied as a new best (:mod:`lrwatch.hook.best`). A stop decision then names the newest such
step at or before its own: the hook restores that copy before it stops, as Keras's
``restore_best_weights`` does. Only a hook that writes the tag understands a stop with a step,
so a run without it (an older lrwatch, DDP/FSDP, no validation loss logged, ``rollback=False``)
gets plain stops. Only when the monitored metric is a validation loss: the copy is the best by
that loss, not by a metric configured in its place.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable
from typing import Any

from lrwatch import schema
from lrwatch.schema import ActionKind, Decision, Scalar

MAX_KEPT = 256  # marks remembered: a stop names the newest at or before its step


class KeptBest:
    """The hook's best-copy marks seen so far, by step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []

    def note(self, scalars: Iterable[Scalar]) -> None:
        for s in scalars:
            if s.tag == schema.KEPT_BEST:
                at = bisect.bisect_left(self.steps, s.step)
                if at < len(self.steps) and self.steps[at] == s.step:
                    self.values[at] = s.value
                    continue
                self.steps.insert(at, s.step)
                self.values.insert(at, s.value)
        del self.steps[:-MAX_KEPT], self.values[:-MAX_KEPT]

    def on_stop(self, decision: Decision, metric: str | None) -> Decision:
        """``decision`` naming the kept copy when it is a stop and there is one to restore."""
        if decision.action is not ActionKind.STOP or metric not in schema.VAL_LOSS_TAGS:
            return decision
        i = bisect.bisect_right(self.steps, decision.step) - 1
        if i < 0:
            return decision
        step, value = self.steps[i], self.values[i]
        why = (
            f" The hook restores the weights it kept at step {step} ({metric} {value:.4g}, the "
            "lowest it saw) before stopping."
        )
        return dataclasses.replace(decision, to_step=step, reason=decision.reason + why)

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values)}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Absent from analyzer states saved before best copies existed: none then."""
        state = state or {"steps": [], "values": []}
        self.steps = [int(s) for s in state["steps"]]
        self.values = [float(v) for v in state["values"]]
