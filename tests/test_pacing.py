"""When the daemon looks: coalescing, rescan interval and the quiet schedule, with plain numbers."""

from __future__ import annotations

import math

import pytest

from lrwatch.daemon.pacing import (
    IDLE_SHARE,
    MAX_RESCAN,
    MIN_RESCAN,
    Coalescer,
    QuietSchedule,
    rescan_interval,
)


def test_coalescer_after_a_quiet_spell_should_not_wait() -> None:
    pacer = Coalescer()
    assert pacer.delay(100.0) == 0.0
    pacer.passed(100.0, 100.004)
    assert pacer.delay(101.0) == 0.0  # a second later: the burst is long over


@pytest.mark.parametrize(
    ("duty", "pass_secs", "woken_after", "want"),
    [
        (0.5, 0.004, 0.0, 0.004),  # a write during/at the end of a 4 ms pass waits 4 ms
        (0.5, 0.004, 0.003, 0.001),  # ...less the time already gone
        (0.25, 0.004, 0.0, 0.012),  # passes at most a quarter of the time: 3x the pass
        (0.5, 1.0, 0.0, 0.05),  # a long pass: never more than MAX_WINDOW
        (1.0, 0.004, 0.0, 0.0),  # duty 1: no coalescing at all
    ],
    ids=["storm", "partly-waited", "quarter-duty", "capped", "no-coalescing"],
)
def test_coalescer_under_a_storm_should_keep_passes_within_their_share(
    duty: float, pass_secs: float, woken_after: float, want: float
) -> None:
    pacer = Coalescer(duty=duty)
    pacer.passed(10.0, 10.0 + pass_secs)
    assert pacer.delay(10.0 + pass_secs + woken_after) == pytest.approx(want)


def test_coalescer_should_refuse_a_bad_duty() -> None:
    with pytest.raises(ValueError, match="duty"):
        Coalescer(duty=0.0)


@pytest.mark.parametrize(
    ("cpu", "want"),
    [(0.0, MIN_RESCAN), (0.001, MIN_RESCAN), (0.02, 0.02 / IDLE_SHARE), (1.0, MAX_RESCAN)],
    ids=["free", "cheap", "costly", "capped"],
)
def test_rescan_interval_should_keep_full_passes_within_their_share(
    cpu: float, want: float
) -> None:
    assert rescan_interval(cpu) == pytest.approx(want)
    # the bound it promises: rescans cost at most IDLE_SHARE of a core unless capped
    assert cpu / rescan_interval(cpu) <= IDLE_SHARE or rescan_interval(cpu) == MAX_RESCAN


@pytest.mark.parametrize(
    ("age", "want"),
    [(0.0, 1.0), (3.0, 1.0), (16.0, 2.0), (40.0, 5.0), (64.0, 8.0), (3600.0, 8.0)],
)
def test_quiet_schedule_interval_should_grow_with_quiet_time_up_to_its_bound(
    age: float, want: float
) -> None:
    assert QuietSchedule(poll=1.0).interval(age) == want


def test_quiet_schedule_should_hand_out_each_due_key_once_in_plan_order() -> None:
    s = QuietSchedule(poll=1.0)
    s.plan("quiet", now=0.0, age=3600.0)  # due at 8
    s.plan("busy", now=0.0, age=0.0)  # due at 1
    s.plan("busy", now=0.5, age=0.0)  # re-planned: due at 1.5, the plan at 1 is stale
    assert s.due(1.0) == []
    assert s.next_due() == 1.5
    assert s.due(2.0) == ["busy"]
    assert s.due(2.0) == []
    assert "quiet" in s and "busy" not in s
    s.forget("quiet")
    assert s.due(100.0) == [] and s.next_due() == math.inf
