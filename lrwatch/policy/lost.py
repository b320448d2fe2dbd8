"""The answer when the model itself is gone: roll it back once, then stop.

Gone means non-finite weights, or a loss non-finite for ``nonfinite_stuck`` logged points in a
row (a bad batch gives one; an LR cut cures a model whose weights are finite, and the first
non-finite point already got one). No cooldown applies: every further step is wasted compute.
The first answer is a rollback to the last good step (the hook's in-memory copy of the weights
and optimizer state); if the model is gone again after it, a stop that names that step.

Kept apart from :mod:`.policy` because it reads and writes only the non-finite counters of
:class:`~lrwatch.policy.state.PolicyState` and needs no plan, cooldown or budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lrwatch.policy.responses import headline
from lrwatch.policy.state import PolicyState
from lrwatch.schema import ActionKind, Decision, Finding, Kind

LOST_RANK = 4  # the non-finite response's rank: no cut while a rollback settles


@dataclass(frozen=True)
class LostModel:
    """Settings: ``nonfinite_stuck`` points of a non-finite loss make a lost model; a rollback
    whose streak began before it is given ``2 * settle_steps`` to show in the data."""

    nonfinite_stuck: int
    settle_steps: int

    def answer(self, step: int, findings: Sequence[Finding], s: PolicyState) -> Decision | None:
        """A rollback or a stop for a lost model (recorded in ``s``), or None."""
        for f in findings:
            what = self._gone(f)
            if what is None or self._rollback_pending(step, f, s):
                continue
            good = f.evidence.get("last_good")
            if good is not None and s.lost_rollback_step is None:
                s.rollbacks, s.last_action_step, s.cooldown_rank = s.rollbacks + 1, step, LOST_RANK
                s.lost_rollback_step = step
                text = (
                    f"{headline((f,))}. Roll back: {what}; the weights and optimizer state go "
                    f"back to the hook's newest copy at or before step {good}, the last good "
                    "one (the LR cut in force stays). If the model is gone again, the run stops."
                )
                return Decision(step, ActionKind.ROLLBACK, text, findings=(f,), to_step=good)
            s.stopped = True
            last = f"the last good step is {good}" if good is not None else "no good step"
            text = (
                f"{headline((f,))}. Stop: {what}, so no LR cut can rescue this run; "
                f"{last} (logged). Resume from a checkpoint at or before it with a lower LR."
            )
            return Decision(step, ActionKind.STOP, text, findings=(f,))
        return None

    def _gone(self, f: Finding) -> str | None:
        """What says the model is gone, or None."""
        role, run = f.evidence.get("role"), int(f.evidence.get("consecutive", 0))
        if f.kind is not Kind.NONFINITE:
            return None
        if role == "weight_norm":
            return "the weights are non-finite"
        if role == "loss" and run >= self.nonfinite_stuck:
            return f"the loss has been non-finite for {run} logged steps in a row"
        return None

    def _rollback_pending(self, step: int, f: Finding, s: PolicyState) -> bool:
        """After a rollback for a lost model: whether its effect can still be on its way. A
        streak of non-finite values that began after it (its last good step is later) means
        the rollback did not help; one that began before it is given ``2 * settle_steps``."""
        back = s.lost_rollback_step
        if back is None:
            return False
        good = f.evidence.get("last_good")
        if isinstance(good, int) and good >= back:
            return False
        return step - back < 2 * self.settle_steps
