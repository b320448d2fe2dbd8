"""How far the LR may still be cut: the ``min_lr`` floor, the ``max_total_cut`` budget, stops.

Pure rules over a plan and the policy's counters: no state of their own, and each answers one
question (which factor, or why stop).
"""

from __future__ import annotations

import logging

from lrwatch import schema
from lrwatch.policy.responses import Plan
from lrwatch.policy.state import PolicyState
from lrwatch.schema import Kind

logger = logging.getLogger(__name__)

_SLACK = 1e-9  # cumulative cuts are products of floats: 1024 must fit in a 1024 budget


def stop_reason(
    plan: Plan, state: PolicyState, *, nonfinite_max_cuts: int, max_total_cut: float
) -> str | None:
    """Why this plan ends the run instead, or None."""
    if plan.stop:
        return f"Stop: {plan.why}; the model is overfitting and more steps make it worse."
    if plan.kind is Kind.NONFINITE and state.nonfinite_cuts > nonfinite_max_cuts:
        return (
            f"Stop: non-finite values persist after {state.nonfinite_cuts - 1} cut(s) by 10 "
            "with clipping. Resume from the last good checkpoint with a lower LR."
        )
    if plan.factor is not None and state.total_cut * 2 > max_total_cut * (1 + _SLACK):
        return (
            f"Stop: the LR is already cut {state.total_cut:g}x from its start, the budget "
            f"(max_total_cut={max_total_cut:g}); further cuts will not rescue this run."
        )
    return None


def fit_factor(
    want: int | None,
    lr: float | None,
    *,
    total_cut: float,
    max_total_cut: float,
    min_lr: float,
) -> tuple[int | None, str]:
    """The largest allowed factor <= ``want`` within the budget and above ``min_lr``.

    Returns the factor (None: no cut fits) and, when it is smaller than ``want``, a note for
    the reason text saying which limit reduced it.
    """
    if want is None:
        return None, ""
    budget = max_total_cut * (1 + _SLACK) / total_cut
    fits = [f for f in schema.ALLOWED_LR_FACTORS if f <= min(want, budget)]
    floor = [f for f in fits if lr is None or lr / f >= min_lr * (1 - 1e-12)]
    if not floor:
        logger.debug("no cut: lr %s is at the floor min_lr=%s", lr, min_lr)
        return None, ""
    factor = max(floor)
    if factor == want:
        return factor, ""
    if max(fits) > factor:
        return factor, f" ({want} would take the LR below min_lr={min_lr:g})"
    return factor, f" ({want} would exceed max_total_cut={max_total_cut:g})"
