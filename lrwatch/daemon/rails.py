"""Safety rails on the daemon's automatic actions: an LR floor, a cooldown and a budget.

The policy already waits and cools down before it decides; these rails are the daemon's second,
independent line for ``--apply``: whatever the analyzer says, the daemon changes a running job
at most ``budget`` times per ``window`` steps, never twice within ``cooldown`` steps, and never
cuts the effective LR below ``min_lr``. A decision the rails hold back is still recorded and
sent to the hooks as a recommendation, with the reason it was not applied.

Pure computation: no files, clocks or threads; :class:`Ledger` is the state, with
``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrwatch.errors import ConfigError
from lrwatch.policy.responses import urgent
from lrwatch.schema import ActionKind, Decision, Kind

# Decisions a control file can carry; raise_lr_advice is advice by definition.
APPLICABLE = (ActionKind.LR_CUT, ActionKind.CLIP, ActionKind.STOP, ActionKind.ROLLBACK)


@dataclass(frozen=True)
class Issued:
    """An action the daemon wrote to a run's control file."""

    id: int
    step: int
    action: ActionKind


@dataclass(frozen=True)
class Rails:
    """Limits on automatic actions (apply mode only).

    Args:
        min_lr: an LR cut that would take the effective LR (``lrwatch/lr``) below this floor is
            only recommended; 1e-8 is below any LR that still trains.
        cooldown: steps after an applied action before the next one (a stop is exempt): the
            effect of a cut must show in the metrics before the next decision is trusted.
        settle: the cooldown of an answer that cannot wait (a divergence, non-finite values, an
            early critical update ratio: ``policy.responses.urgent``): 10 steps. Waiting 100
            steps at an LR that diverged wastes them all; the policy already spaces its
            escalations by its ``settle_steps`` (20), so this rail only stops a burst.
        budget: automatic decisions per ``window`` steps (actions the policy pairs at one step,
            such as a cut with a clip, count once); past it the daemon only recommends, so a
            misfiring detector can at most cost ``budget`` decisions before a human looks. A
            stop or rollback of a lost run (non-finite, or diverged) is exempt.
        window: the budget's window, in optimizer steps.
    """

    min_lr: float = 1e-8
    cooldown: int = 100
    settle: int = 10
    budget: int = 3
    window: int = 1000

    def __post_init__(self) -> None:
        if not self.min_lr >= 0:
            raise ConfigError(f"min_lr must be >= 0, not {self.min_lr}")
        if self.cooldown < 0 or self.settle < 0 or self.window < 1 or self.budget < 0:
            raise ConfigError(
                f"need cooldown >= 0, settle >= 0, budget >= 0 and window >= 1 (got "
                f"{self.cooldown}, {self.settle}, {self.budget}, {self.window})"
            )

    def hold_back(self, decision: Decision, ledger: Ledger) -> str | None:
        """Why ``decision`` must not be applied now, or None when it may be."""
        if decision.action not in APPLICABLE:
            return "advice only"
        lr, factor = ledger.lr, decision.factor
        if decision.action is ActionKind.LR_CUT and lr is not None and factor:
            if lr / factor < self.min_lr:
                return f"the LR {lr:.3g} / {factor} would fall below the floor {self.min_lr:.3g}"
        # The policy may pair actions at one step (a cut with a clip): one decision for the rails.
        steps = {a.step for a in ledger.issued}
        if decision.step in steps:
            return None
        if decision.action in (ActionKind.STOP, ActionKind.ROLLBACK) and _model_gone(decision):
            return None  # every further step is wasted: no cooldown, and no budget either
        last = max(steps, default=None)
        wait = self.settle if any(map(urgent, decision.findings)) else self.cooldown
        if last is not None and decision.action is not ActionKind.STOP:
            if decision.step - last < wait:
                return f"cooldown: the last action was at step {last} (cooldown {wait})"
        recent = [s for s in steps if s > decision.step - self.window]
        if len(recent) >= self.budget:
            return f"budget: {len(recent)} automatic decisions in the last {self.window} steps"
        return None


def _answers(decision: Decision, *kinds: Kind) -> bool:
    return any(f.kind in kinds for f in decision.findings)


def _model_gone(decision: Decision) -> bool:
    """A stop or a rollback for a run no LR saves: non-finite values that stayed, or a
    divergence. The budget bounds what a misfiring detector can do to a healthy run; the answer
    to a lost run must not wait on it (the policy issues each of them a bounded number of
    times)."""
    return _answers(decision, Kind.NONFINITE, Kind.DIVERGENCE)


@dataclass
class Ledger:
    """What the daemon did to one run: actions issued, acknowledgements seen, the last LR."""

    issued: list[Issued] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    lr: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "issued": [{"id": a.id, "step": a.step, "action": a.action.value} for a in self.issued],
            "acked": sorted(self.acked),
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.issued = [
            Issued(int(a["id"]), int(a["step"]), ActionKind(a["action"]))
            for a in state.get("issued", [])
        ]
        self.acked = {int(i) for i in state.get("acked", [])}
        lr = state.get("lr")
        self.lr = None if lr is None else float(lr)
