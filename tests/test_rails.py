"""The daemon's safety rails: LR floor, cooldown and budget, table-driven; the ledger round trip."""

from __future__ import annotations

import json

import pytest

from lrwatch.daemon.rails import Issued, Ledger, Rails
from lrwatch.errors import ConfigError
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity

CUT = ActionKind.LR_CUT
RAILS = Rails(min_lr=1e-4, cooldown=10, budget=2, window=100)


def cut(step: int, factor: int = 2) -> Decision:
    return Decision(step=step, action=CUT, reason="r", factor=factor)


@pytest.mark.parametrize(
    ("decision", "issued", "lr", "held"),
    [
        (cut(50), [], 0.1, None),
        (cut(50), [], None, None),  # no logged LR: the hook's own floor still applies
        (cut(50, 10), [], 1e-3, None),  # exactly at the floor is allowed
        (cut(50, 10), [], 9e-4, "the LR 0.0009 / 10 would fall below the floor 0.0001"),
        (cut(50), [(1, 45)], 0.1, "cooldown: the last action was at step 45 (cooldown 10)"),
        (cut(55), [(1, 45)], 0.1, None),  # cooldown over
        (cut(90), [(1, 20), (2, 60)], 0.1, "budget: 2 automatic decisions in the last 100 steps"),
        (cut(120), [(1, 20), (2, 60)], 0.1, None),  # step 20 left the window
        (Decision(61, ActionKind.STOP, "r"), [(1, 60)], 0.1, None),  # a stop ignores cooldown
        (
            Decision(90, ActionKind.STOP, "r"),
            [(1, 20), (2, 60)],
            0.1,
            "budget: 2 automatic decisions in the last 100 steps",
        ),
        (Decision(5, ActionKind.RAISE_LR_ADVICE, "r"), [], 0.1, "advice only"),
        (Decision(60, ActionKind.CLIP, "r", max_norm=1.0), [(1, 20), (2, 60)], 0.1, None),
    ],
    ids=[
        "free",
        "lr-unknown",
        "at-floor",
        "below-floor",
        "cooldown",
        "after-cooldown",
        "budget",
        "budget-window-slides",
        "stop-no-cooldown",
        "stop-budget",
        "advice",
        "paired-with-an-issued-cut",
    ],
)
def test_hold_back_should_apply_floor_cooldown_and_budget(
    decision: Decision, issued: list[tuple[int, int]], lr: float | None, held: str | None
) -> None:
    ledger = Ledger(issued=[Issued(i, s, CUT) for i, s in issued], lr=lr)
    assert RAILS.hold_back(decision, ledger) == held


def answering(kind: Kind, decision: Decision) -> Decision:
    f = Finding(kind, decision.step, "loss", Severity.CRITICAL, {}, "m")
    return Decision(decision.step, decision.action, "r", factor=decision.factor, findings=(f,))


@pytest.mark.parametrize(
    ("decision", "held"),
    [
        (answering(Kind.DIVERGENCE, cut(50, 10)), None),  # settle (5) passed, cooldown not
        (
            answering(Kind.DIVERGENCE, cut(48, 10)),
            "cooldown: the last action was at step 45 (cooldown 5)",
        ),
        (
            answering(Kind.EXPLOSION, cut(50, 10)),
            "cooldown: the last action was at step 45 (cooldown 10)",
        ),
        (answering(Kind.NONFINITE, Decision(46, ActionKind.ROLLBACK, "r", to_step=40)), None),
    ],
    ids=["divergence-settled", "divergence-settling", "explosion-cooldown", "nonfinite-rollback"],
)
def test_a_cut_answering_a_divergence_should_wait_only_the_settling_time(
    decision: Decision, held: str | None
) -> None:
    rails = Rails(cooldown=10, settle=5, budget=5)
    assert rails.hold_back(decision, Ledger(issued=[Issued(1, 45, CUT)])) == held


@pytest.mark.parametrize(
    ("kind", "held"),
    [
        (Kind.NONFINITE, None),
        (Kind.DIVERGENCE, None),
        (Kind.OVERFIT, "budget: 2 automatic decisions in the last 100 steps"),
    ],
)
def test_only_the_stop_of_a_lost_run_should_pass_an_exhausted_budget(
    kind: Kind, held: str | None
) -> None:
    ledger = Ledger(issued=[Issued(1, 20, CUT), Issued(2, 60, CUT)])
    assert RAILS.hold_back(answering(kind, Decision(90, ActionKind.STOP, "r")), ledger) == held


def test_a_zero_budget_should_hold_back_everything() -> None:
    assert Rails(budget=0).hold_back(cut(5), Ledger()) == (
        "budget: 0 automatic decisions in the last 1000 steps"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_lr": -1.0},
        {"min_lr": float("nan")},
        {"cooldown": -1},
        {"settle": -1},
        {"window": 0},
        {"budget": -1},
    ],
)
def test_rails_should_refuse_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Rails(**kwargs)  # type: ignore[arg-type]


def test_ledger_state_should_round_trip_through_json() -> None:
    ledger = Ledger(issued=[Issued(1, 20, CUT), Issued(2, 80, ActionKind.CLIP)], acked={1}, lr=0.05)
    again = Ledger()
    again.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again == ledger
    empty = Ledger()
    empty.load_state_dict(Ledger().state_dict())
    assert empty == Ledger()
