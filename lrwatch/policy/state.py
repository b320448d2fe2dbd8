"""The policy's counters: cooldown, cumulative cut, clip in force, runs of NaNs and overfits.

This is the state machine that survives restarts (what ``Policy.state_dict()`` saves), kept
apart from the rules that read it. Plain JSON types only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from lrwatch.schema import Finding, Kind


@dataclass
class PolicyState:
    """Everything the policy has learned about one run; settings stay on the policy."""

    total_cut: float = 1.0  # cumulative divisor of the LR cuts issued or acknowledged
    start_lr: float | None = None
    clip_max_norm: float | None = None  # the clip in force
    last_action_step: int | None = None
    cooldown_rank: int = -1  # rank of the action whose cooldown runs
    last_advice_step: int | None = None
    nonfinite_cuts: int = 0  # non-finite interventions in a row
    last_nonfinite_step: int | None = None
    overfit_checks: int = 0  # checks in a row reporting overfitting
    last_overfit_step: int | None = None
    stopped: bool = False
    rollbacks: int = 0  # rollbacks issued
    lost_rollback_step: int | None = None  # when a lost (non-finite) model was rolled back

    def observe(self, findings: Sequence[Finding], *, lr: float | None, warmup: bool) -> None:
        """Learn the starting LR and count the checks in a row that report overfitting.

        A quiet check (no findings) ends the run of overfit reports.
        """
        if self.start_lr is None and lr is not None and not warmup and self.total_cut == 1.0:
            self.start_lr = float(lr)
        if not findings:
            self.overfit_checks, self.last_overfit_step = 0, None
        for at in sorted({f.step for f in findings if f.kind is Kind.OVERFIT}):
            if self.last_overfit_step is None or at > self.last_overfit_step:
                self.overfit_checks, self.last_overfit_step = self.overfit_checks + 1, at

    def count_nonfinite(self, step: int, *, cooldown_steps: int) -> None:
        """A non-finite step within two cooldowns of the last one: the cut did not cure it."""
        recent = self.last_nonfinite_step is not None and (
            step - self.last_nonfinite_step <= 2 * cooldown_steps
        )
        self.nonfinite_cuts = self.nonfinite_cuts + 1 if recent else 1
        self.last_nonfinite_step = step

    def in_cooldown(self, step: int, *, cooldown_steps: int) -> bool:
        """Whether ``step`` is within ``cooldown_steps`` of the last action."""
        last = self.last_action_step
        return last is not None and step < last + cooldown_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PolicyState:
        """The inverse of :meth:`to_dict`; unknown keys mean the state is not a policy's."""
        unknown = set(state) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"not a Policy state: unknown keys {sorted(unknown)}")
        return cls(**state)
