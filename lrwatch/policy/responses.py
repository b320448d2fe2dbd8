"""The policy's response table: what one finding asks for, before any state has its say.

The table (finding kind -> rank, factor, reason) reads on one screen; the cooldown, floor and
budget that decide whether a response happens live in :mod:`.policy` and :mod:`.budget`.

Responses, strongest first (a stronger one may act during a weaker one's cooldown):

===========  ====================================================  ====
finding      response                                              rank
===========  ====================================================  ====
nonfinite    cut by 10 + clip; advise resuming from a checkpoint   4
divergence   cut by 10 + roll the weights back to the last good      3
             step; again after ``settle_steps`` while the loss
             stays diverged (the policy's escalation)
explosion    cut by 10 (critical) or 5 (warning) + clip; with          3
             ``clip_first``, a first spike gets the clip alone;
             a lone spike under 5x (``info``) gets nothing
oscillation  cut by 10, or 5 when ``evidence["mild"]``             2
ratio_high   cut by 5 (critical) or 2 (warning); not in warm-up,   2
             none when info (the loss clearly falls); *early*
             (10 points, loss not falling): cut by 10 + roll back
             to the window's start, escalating like a divergence
plateau      cut by 2 (never during warm-up)                       1
overfit      stop once reported at ``overfit_patience`` checks     1
ratio_low    advise raising the LR (advice only, not in warm-up    0
             or deep in a decaying tail,
             repeated at most every 10 cooldowns)
slow_        the same advice, for a loss still falling in a        0
progress     straight line since the start
===========  ====================================================  ====
"""

from __future__ import annotations

from dataclasses import dataclass

from lrwatch.schema import Finding, Kind, Severity


@dataclass(frozen=True)
class Plan:
    """What one finding asks for, before cooldown, floor and budget have their say."""

    kind: Kind
    rank: int
    why: str
    factor: int | None = None
    clip: bool = False
    stop: bool = False
    advice: bool = False
    rollback: bool = False  # also roll the weights back to the finding's last good step

    def strength(self) -> tuple[int, bool, int, bool]:
        """Order between plans: rank first, then a stop, a larger cut, a clip."""
        return self.rank, self.stop, self.factor or 0, self.clip


def plan_for(
    f: Finding, *, warmup: bool, clip_only: bool = False, rising: bool | None = None
) -> Plan | None:
    """The table of the module docstring, one finding at a time (overfit excepted: see below).

    ``clip_only``: answer a spike (not a sustained climb) with clipping alone (``clip_first``).
    ``warmup``: the schedule is moving the LR itself (a warm-up, a recent cut, a decay);
    ``rising``: the LR is warming up (default: ``warmup``). Raise-the-LR advice and the cuts for
    a high update ratio wait only for a warm-up: a decay that starts from an LR too low is still
    too low, and one that starts from an LR far too high is still unstable (a decay close to
    its tail is the caller's ``defer``).
    """
    rising = warmup if rising is None else rising
    critical = f.severity is Severity.CRITICAL
    if f.kind is Kind.NONFINITE:
        why = "the largest factor, for a step that overflowed; clipping bounds the next spike"
        return Plan(f.kind, 4, why, factor=10, clip=True)
    if f.kind is Kind.DIVERGENCE:
        why = "10 because the loss sits far above where the run began and is not coming back"
        return Plan(f.kind, 3, why, factor=10, rollback=True)
    if f.kind is Kind.EXPLOSION and f.severity is Severity.INFO:
        return None  # a lone moderate spike: noise until it repeats or grows (the detector)
    if f.kind is Kind.EXPLOSION and clip_only and f.evidence.get("rule") != "trend":
        why = "a first spike: clipping bounds it; the LR is cut if explosions come back"
        return Plan(f.kind, 3, why, clip=True)
    if f.kind is Kind.EXPLOSION:
        why = (
            "10 for a sustained, large explosion"
            if critical
            else "5 for a spike, not (yet) sustained"
        )
        return Plan(f.kind, 3, why, factor=10 if critical else 5, clip=True)
    if f.kind is Kind.OSCILLATION:
        if f.evidence.get("mild", False):
            return Plan(f.kind, 2, "5 because the oscillation is mild", factor=5)
        return Plan(
            f.kind, 2, "10 because a loss bouncing in a band means an LR far too high", factor=10
        )
    if f.kind is Kind.RATIO_HIGH and f.severity is Severity.INFO:
        return None  # a high ratio while the loss clearly falls: an aggressive LR that works
    if f.kind is Kind.RATIO_HIGH and f.evidence.get("early") and not rising:
        why = (
            "10 because updates of 9% of the weights per step from the start, with a loss that "
            "does not fall, mean an LR an order of magnitude too high"
        )
        return Plan(f.kind, 2, why, factor=10, rollback=True)
    if f.kind is Kind.RATIO_HIGH and not rising:  # early updates are large by design
        factor = 5 if critical else 2
        why = f"{factor} because updates far above ~1e-3 of the weights signal instability"
        return Plan(f.kind, 2, why, factor=factor)
    if f.kind is Kind.PLATEAU and not warmup:
        return Plan(f.kind, 1, "halving is the gentle factor for a stalled metric", factor=2)
    if f.kind is Kind.RATIO_LOW and not rising:
        return Plan(f.kind, 0, "updates far below ~1e-3 of the weights", advice=True)
    if f.kind is Kind.SLOW_PROGRESS and not rising:
        why = "a loss still falling in a straight line since the start"
        return Plan(f.kind, 0, why, advice=True)
    return None


def escalates(f: Finding) -> bool:
    """A finding that, still there ``settle_steps`` after an action, asks for the next cut at
    once: a divergence, or an early critical update ratio (a run far too hot from the start)."""
    early = f.kind is Kind.RATIO_HIGH and bool(f.evidence.get("early"))
    return f.kind is Kind.DIVERGENCE or early


def urgent(f: Finding) -> bool:
    """A finding whose answer cannot wait out the daemon's cooldown: one that escalates, or
    non-finite values."""
    return escalates(f) or f.kind is Kind.NONFINITE


def overfit_stop(checks: int) -> Plan:
    """The stop an overfit finding asks for once it was reported at enough checks in a row."""
    why = f"validation worsened at {checks} checks in a row"
    return Plan(Kind.OVERFIT, 1, why, stop=True)


def headline(findings: tuple[Finding, ...]) -> str:
    """'plateau on val/loss at step 1200 (<message>)' for the first finding, '(+n more)'."""
    f = findings[0]
    text = f"{f.kind.value} on {f.tag} at step {f.step}"
    if f.message:
        text += f" ({f.message})"
    return text + (f" (+{len(findings) - 1} more)" if len(findings) > 1 else "")
