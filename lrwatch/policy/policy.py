"""The policy: a run's findings -> at most one intervention at a time, each with a reason.

An intervention is a list of :class:`~lrwatch.schema.Decision`: usually one, and two when an
explosion or a non-finite step asks for an LR cut *and* gradient clipping (cut first, then
clip; both carry the same findings). Each decision keeps one action, so it maps one-to-one onto a
control-file action and onto one ``analyze --json`` entry ``{"step", "action", "factor" |
"max_norm", "reason"}``.

The response each finding asks for is the table in :mod:`.responses`; the counters
live in :mod:`.state`, the floor, budget and stop rules in
:mod:`.budget`, the clip threshold in :mod:`.autoclip`, the answer to a model gone
non-finite (rollback, then stop) in :mod:`.lost`. This module joins them: which response wins,
the cooldown and its escalation, and the reason text of each decision.

Stop also when the next cut would take the cumulative cut past ``max_total_cut`` (1024 = ten
halvings), or when non-finite values come back within two cooldowns of ``nonfinite_max_cuts``
non-finite cuts. A cut is reduced to the largest allowed factor (2, 5, 10) that keeps the LR
at or above ``min_lr``; if none does, there is no cut.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from numpy.typing import ArrayLike

from lrwatch.errors import ConfigError
from lrwatch.policy.autoclip import clip_threshold
from lrwatch.policy.budget import fit_factor, stop_reason
from lrwatch.policy.lost import LostModel
from lrwatch.policy.responses import Plan, escalates, headline, overfit_stop, plan_for
from lrwatch.policy.state import PolicyState
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity

logger = logging.getLogger(__name__)

# Advice is for a human who has read it once: repeating it every cooldown would bury the log.
_ADVICE_EVERY_COOLDOWNS = 10


class Policy:
    """Turn findings into decisions, with a cooldown, an LR floor and a total-cut budget.

    Call :meth:`decide` at every evaluation, with an empty list when the detectors found
    nothing: quiet checks are how the policy learns that overfitting stopped.

    Args:
        cooldown_steps: steps after an action before a response of the same or lower rank.
            200: long enough for a cut's effect to show in a loss smoothed over ~100 steps.
        min_lr: never cut below this LR (checked when ``decide`` gets ``lr``). 0.0.
        max_total_cut: stop instead of cutting past this cumulative divisor of the starting
            LR. 1024: ten halvings; by then the LR is not the problem.
        clip_percentile: max_norm for a new clip, as a percentile of the recent finite grad
            norms (AutoClip-style). 90: clips the spikes, leaves ordinary steps alone.
        min_grad_norms: fewer finite grad norms than this use ``fallback_max_norm``. 20.
        fallback_max_norm: max_norm without a usable history. 1.0, the common LLM default.
        nonfinite_max_cuts: non-finite cuts in a row (each within two cooldowns of the last)
            before a returning NaN stops the run. 2.
        overfit_patience: checks reporting overfitting, in a row, before a stop. 2: the
            overfit detector already waits for several worse evaluations; one more confirms.
        nonfinite_stuck: logged points in a row of a non-finite loss that stop the run at once
            (non-finite weights stop it at the first point). 10: a bad batch gives one, and
            ten steps are enough for the first non-finite point's cut by 10 to show.
        max_rollbacks: rollbacks (to the last good step, with a divergence's cut) per run. 3:
            each comes with a cut by 10, so three span 1000x; past that the cuts go on alone.
        settle_steps: steps after an action before a divergence that persists (the loss still
            far above its start and not falling) escalates past the cooldown with another cut.
            20: a diverged loss answers a right-sized cut within a few steps; ten more points
            show whether it did.
        clip_first: answer the first explosion spike, while no clip is in force, with
            clipping alone; cut the LR only when an explosion comes back under clipping (or
            when the explosion is a sustained climb, or values turn non-finite). False: the
            issue's rule, clip and cut at once. True suits large runs whose spikes usually
            recover by themselves (BLOOM 176B at step 31214: the humans did nothing).

    Example:
        >>> p = Policy(cooldown_steps=100)
        >>> f = Finding(Kind.PLATEAU, 500, "val/loss", Severity.INFO, {})
        >>> [(d.action.value, d.factor) for d in p.decide(500, [f], lr=1e-3)]
        [('lr_cut', 2)]
        >>> p.decide(550, [f], lr=5e-4)  # cooling down
        []
    """

    def __init__(
        self,
        *,
        cooldown_steps: int = 200,
        min_lr: float = 0.0,
        max_total_cut: float = 1024.0,
        clip_percentile: float = 90.0,
        min_grad_norms: int = 20,
        fallback_max_norm: float = 1.0,
        nonfinite_max_cuts: int = 2,
        overfit_patience: int = 2,
        clip_first: bool = False,
        nonfinite_stuck: int = 10,
        settle_steps: int = 20,
        max_rollbacks: int = 3,
    ) -> None:
        _check_int("cooldown_steps", cooldown_steps, least=0)
        _check_int("min_grad_norms", min_grad_norms, least=1)
        _check_int("nonfinite_max_cuts", nonfinite_max_cuts, least=0)
        _check_int("overfit_patience", overfit_patience, least=1)
        _check_int("nonfinite_stuck", nonfinite_stuck, least=2)
        _check_int("settle_steps", settle_steps, least=1)
        self.settle_steps = settle_steps
        _check_int("max_rollbacks", max_rollbacks, least=0)
        self.max_rollbacks = max_rollbacks
        self.nonfinite_stuck = nonfinite_stuck
        if not (math.isfinite(min_lr) and min_lr >= 0):
            raise ConfigError(f"min_lr={min_lr!r}: use a finite LR >= 0")
        if not (math.isfinite(max_total_cut) and max_total_cut >= 2):
            raise ConfigError(f"max_total_cut={max_total_cut!r}: use >= 2 (1024 = ten halvings)")
        if not 0 < clip_percentile <= 100:
            raise ConfigError(f"clip_percentile={clip_percentile!r}: use a percentile in (0, 100]")
        if not (math.isfinite(fallback_max_norm) and fallback_max_norm > 0):
            raise ConfigError(f"fallback_max_norm={fallback_max_norm!r}: use a norm > 0")
        self.cooldown_steps, self.min_lr, self.max_total_cut = cooldown_steps, min_lr, max_total_cut
        self.clip_percentile, self.min_grad_norms = clip_percentile, min_grad_norms
        self.fallback_max_norm = fallback_max_norm
        self.nonfinite_max_cuts, self.overfit_patience = nonfinite_max_cuts, overfit_patience
        if not isinstance(clip_first, bool):
            raise ConfigError(f"clip_first={clip_first!r}: use true or false")
        self.clip_first = clip_first
        self._state = PolicyState()
        # (finding, why) for each warning or critical finding of the last decide() that led
        # to no decision: a warning nobody acts on must say why (serve prints it)
        self.unanswered: list[tuple[Finding, str]] = []

    # ------------------------------------------------------------------ the algorithm
    def decide(
        self,
        step: int,
        findings: Sequence[Finding],
        *,
        lr: float | None = None,
        warmup: bool = False,
        grad_norms: ArrayLike | None = None,
        defer: str | None = None,
        rising: bool | None = None,
    ) -> list[Decision]:
        """The intervention for this check: [], [cut], [clip], [cut, clip], [stop] or [advice].

        ``grad_norms`` is the recent grad-norm window: values, or the analyzer's
        ``(steps, values)`` pair. ``lr`` is the run's current LR, for the floor and the reason.
        ``defer`` says why the schedule is about to lower the LR itself (a step cut is near, a
        decay is deep in its tail): then only explosions and non-finite values get a cut.
        """
        s = self._state
        if s.stopped:
            self._unanswered(findings, [], lambda f: "the run is already stopped")
            return []
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            lr = None  # a NaN or negative logged LR says nothing about the floor
        s.observe(findings, lr=lr, warmup=warmup)
        lost = LostModel(self.nonfinite_stuck, self.settle_steps).answer(step, findings, s)
        if lost is not None:  # no cooldown wait: every further step is wasted compute
            why_not = f"the {lost.action.value} at this step answers the run as a whole"
            self._unanswered(findings, [lost], lambda f: why_not)
            return [lost]
        plan, why = self._choose(findings, warmup=warmup, defer=defer is not None, rising=rising)
        cooling = plan is not None and self.in_cooldown(step) and plan.rank <= s.cooldown_rank
        cooling = cooling and not self._escalates(step, why)
        out = []
        if plan is not None and not cooling:
            out = self._act(step, plan, why, lr=lr, grad_norms=grad_norms)
        self._unanswered(
            findings, out, lambda f: self._why_quiet(step, f, warmup=warmup, defer=defer)
        )
        return out

    def _escalates(self, step: int, why: tuple[Finding, ...]) -> bool:
        """A divergence (or an early critical update ratio) ``settle_steps`` or more after the
        last action: that action did not bring the run back, so waiting out the cooldown only
        wastes steps at a bad LR."""
        last = self._state.last_action_step
        return last is not None and step - last >= self.settle_steps and any(map(escalates, why))

    def _unanswered(
        self, findings: Sequence[Finding], out: list[Decision], why: Callable[[Finding], str]
    ) -> None:
        answered = [f for d in out for f in d.findings]
        self.unanswered = [
            (f, why(f))
            for f in findings
            if f.severity is not Severity.INFO and not any(f is g for g in answered)
        ]

    def _why_quiet(self, step: int, f: Finding, *, warmup: bool, defer: str | None) -> str:
        """Why ``f`` led to no decision at ``step`` (called after the decision was made)."""
        s = self._state
        plan = plan_for(f, warmup=warmup, clip_only=self.clip_first and s.clip_max_norm is None)
        if f.kind is Kind.OVERFIT and plan is None:
            return (
                f"overfitting stops the run once reported at {self.overfit_patience} checks "
                f"in a row ({s.overfit_checks} so far)"
            )
        if plan is None:
            return "the schedule is moving the LR itself (warm-up, decay or a recent cut)"
        if defer is not None and _deferrable(plan):
            return f"left to the schedule: {defer}"
        if s.last_action_step is not None and step - s.last_action_step <= self.cooldown_steps:
            return (
                f"cooldown: the last action was at step {s.last_action_step}, "
                f"{step - s.last_action_step} of {self.cooldown_steps} steps ago"
            )
        if plan.advice:
            return f"advice already given at step {s.last_advice_step}"
        if plan.factor is not None:
            return f"no cut fits the LR floor min_lr={self.min_lr:g} or the cut budget"
        return "a stronger response was chosen at this step"

    def _choose(
        self,
        findings: Sequence[Finding],
        *,
        warmup: bool,
        defer: bool = False,
        rising: bool | None = None,
    ) -> tuple[Plan | None, tuple[Finding, ...]]:
        """The strongest response asked for, and the findings that asked for it."""
        clip_only = self.clip_first and self._state.clip_max_norm is None
        plans = [
            (p, f)
            for f in findings
            if (p := plan_for(f, warmup=warmup, clip_only=clip_only, rising=rising)) is not None
            and not (defer and _deferrable(p))
        ]
        if self._state.overfit_checks >= self.overfit_patience:
            stop = overfit_stop(self._state.overfit_checks)
            plans += [(stop, f) for f in findings if f.kind is Kind.OVERFIT]
        if not plans:
            return None, ()
        best = max((p for p, _ in plans), key=Plan.strength)
        return best, tuple(f for p, f in plans if p.rank == best.rank)

    def _act(
        self,
        step: int,
        plan: Plan,
        why: tuple[Finding, ...],
        *,
        lr: float | None,
        grad_norms: ArrayLike | None,
    ) -> list[Decision]:
        """Turn the chosen plan into decisions, applying the stop rules, floor and budget."""
        s, seen = self._state, headline(why)
        if plan.advice:
            return self._advise(step, plan, why)
        if plan.kind is Kind.NONFINITE:
            s.count_nonfinite(step, cooldown_steps=self.cooldown_steps)
        stop = stop_reason(
            plan,
            s,
            nonfinite_max_cuts=self.nonfinite_max_cuts,
            max_total_cut=self.max_total_cut,
        )
        if stop is not None:
            s.stopped = True
            return [Decision(step, ActionKind.STOP, f"{seen}. {stop}", findings=why)]
        out = []
        factor, limit = fit_factor(
            plan.factor,
            lr,
            total_cut=s.total_cut,
            max_total_cut=self.max_total_cut,
            min_lr=self.min_lr,
        )
        if factor is not None:
            out.append(self._cut(step, plan, why, factor, limit, lr=lr))
        if plan.rollback:
            out.extend(self._rollback(step, why))
        if plan.clip:
            out.extend(self._clip(step, why, grad_norms, with_cut=factor))
        if out:
            s.last_action_step, s.cooldown_rank = step, plan.rank
        return out

    def _rollback(self, step: int, why: tuple[Finding, ...]) -> list[Decision]:
        """Roll back to the findings' last good step, at most ``max_rollbacks`` times a run."""
        goods = [g for f in why if isinstance(g := f.evidence.get("last_good"), int)]
        if not goods or self._state.rollbacks >= self.max_rollbacks:
            return []
        self._state.rollbacks += 1
        good = min(goods)
        text = (
            f"{headline(why)}. Roll the weights and optimizer state back to the hook's newest "
            f"copy at or before step {good}, the last good step: the steps since then have "
            f"wrecked the weights, which a lower LR alone does not undo (rollback "
            f"{self._state.rollbacks} of at most {self.max_rollbacks})."
        )
        return [Decision(step, ActionKind.ROLLBACK, text, findings=why, to_step=good)]

    def _advise(self, step: int, plan: Plan, why: tuple[Finding, ...]) -> list[Decision]:
        """Advice for a human, at most once every ``_ADVICE_EVERY_COOLDOWNS`` cooldowns."""
        s = self._state
        quiet = _ADVICE_EVERY_COOLDOWNS * self.cooldown_steps
        if s.last_advice_step is not None and step - s.last_advice_step < quiet:
            return []
        s.last_advice_step = step
        text = (
            f"{headline(why)}. Advice only: raise the LR (try 2-3x): {plan.why} mean slow progress."
        )
        return [Decision(step, ActionKind.RAISE_LR_ADVICE, text, findings=why)]

    def _cut(
        self, step: int, plan: Plan, why: tuple[Finding, ...], factor: int, limit: str, *, lr: Any
    ) -> Decision:
        s = self._state
        s.total_cut *= factor
        text = f"{headline(why)}. Cut the LR by {factor}{limit}: {plan.why}."
        if lr is not None:
            text += f" LR {lr:.3g} -> {lr / factor:.3g}."
        text += f" Cumulative cut {s.total_cut:g}x (stop past {self.max_total_cut:g}x)."
        if plan.kind is Kind.NONFINITE:
            text += " If the weights are already non-finite, resume from the last good checkpoint."
        return Decision(step, ActionKind.LR_CUT, text, factor=factor, findings=why)

    def _clip(
        self,
        step: int,
        why: tuple[Finding, ...],
        grad_norms: ArrayLike | None,
        *,
        with_cut: int | None,
    ) -> list[Decision]:
        """A clip at a percentile of the run's own grad norms, unless a tighter one holds."""
        max_norm, source = clip_threshold(
            grad_norms,
            percentile=self.clip_percentile,
            min_norms=self.min_grad_norms,
            fallback=self.fallback_max_norm,
        )
        held = self._state.clip_max_norm
        if held is not None and held <= max_norm:
            return []
        self._state.clip_max_norm = max_norm
        also = f", together with the cut by {with_cut}" if with_cut else ""
        text = f"{headline(why)}. Clip gradients at max_norm={max_norm:.3g}{also}: {source}."
        return [Decision(step, ActionKind.CLIP, text, max_norm=max_norm, findings=why)]

    # ------------------------------------------------------------------ state
    def in_cooldown(self, step: int) -> bool:
        """Whether ``step`` is within ``cooldown_steps`` of the last action."""
        return self._state.in_cooldown(step, cooldown_steps=self.cooldown_steps)

    @property
    def total_cut(self) -> float:
        """Cumulative LR divisor of the cuts issued (or acknowledged, see record_applied)."""
        return self._state.total_cut

    @property
    def start_lr(self) -> float | None:
        """The first LR seen after warm-up and before any cut."""
        return self._state.start_lr

    @property
    def stopped(self) -> bool:
        return self._state.stopped

    def record_applied(
        self, *, lr_factor: float | None = None, max_norm: float | None = None
    ) -> None:
        """Adopt what the hook reports it applied (``lrwatch_control/lr_factor``, a clip in force).

        Human cuts and undos then count towards the budget, and the policy stops assuming that
        an unapplied decision took effect.
        """
        if lr_factor is not None and math.isfinite(lr_factor) and lr_factor > 0:
            self._state.total_cut = float(lr_factor)
        elif lr_factor is not None:
            logger.warning("ignoring an applied lr_factor of %r: not a positive number", lr_factor)
        if max_norm is not None:
            self._state.clip_max_norm = float(max_norm) if max_norm > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """The counters (settings come from the constructor); plain JSON types."""
        return self._state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = PolicyState.from_dict(state)


def _deferrable(plan: Plan) -> bool:
    """A gentle cut the schedule can make instead (plateau, high ratio, oscillation), or
    advice to raise an LR the schedule is lowering anyway."""
    return plan.advice or (plan.rank <= 2 and not plan.stop and plan.factor is not None)


def _check_int(name: str, value: object, *, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name}={value!r}: use an integer >= {least}")
