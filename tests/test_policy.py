"""The policy: findings in, decisions out; cooldown, floor, budget, stop rules, state."""

from __future__ import annotations

import json
import statistics
from typing import Any

import numpy as np
import pytest
import torch

from lrwatch.analysis.detectors.plateau import PlateauTracker
from lrwatch.errors import ConfigError
from lrwatch.policy.policy import Policy
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity

CUT, CLIP, STOP, ADVICE = (
    ActionKind.LR_CUT,
    ActionKind.CLIP,
    ActionKind.STOP,
    ActionKind.RAISE_LR_ADVICE,
)
NORMS = np.random.default_rng(0).lognormal(0.0, 0.3, size=200)
P90 = statistics.quantiles(NORMS.tolist(), n=10, method="inclusive")[8]  # independent oracle


def finding(
    kind: Kind, step: int = 1000, severity: Severity = Severity.WARNING, **evidence: Any
) -> Finding:
    return Finding(kind, step, "val/loss", severity, evidence, f"{kind.value} seen")


def brief(decisions: list[Decision]) -> list[tuple[Any, ...]]:
    """(action, factor, max_norm) per decision, max_norm rounded for comparison."""
    return [
        (d.action, d.factor, None if d.max_norm is None else round(d.max_norm, 9))
        for d in decisions
    ]


P90R = round(P90, 9)


@pytest.mark.parametrize(
    ("findings", "kwargs", "expected"),
    [
        ([finding(Kind.PLATEAU)], {}, [(CUT, 2, None)]),
        ([finding(Kind.PLATEAU)], {"warmup": True}, []),
        ([finding(Kind.OSCILLATION, mild=False)], {}, [(CUT, 10, None)]),
        ([finding(Kind.OSCILLATION, mild=True)], {}, [(CUT, 5, None)]),
        ([finding(Kind.OSCILLATION, mild=True)], {"warmup": True}, [(CUT, 5, None)]),
        ([finding(Kind.EXPLOSION)], {"grad_norms": NORMS}, [(CUT, 5, None), (CLIP, None, P90R)]),
        (
            [finding(Kind.EXPLOSION, severity=Severity.CRITICAL)],
            {"grad_norms": NORMS},
            [(CUT, 10, None), (CLIP, None, P90R)],
        ),
        (
            [finding(Kind.EXPLOSION)],
            {"grad_norms": (np.arange(200), NORMS)},
            [(CUT, 5, None), (CLIP, None, P90R)],
        ),
        (
            [finding(Kind.NONFINITE, severity=Severity.CRITICAL)],
            {"grad_norms": np.r_[np.nan, np.inf, 1.0]},
            [(CUT, 10, None), (CLIP, None, 1.0)],
        ),
        ([finding(Kind.RATIO_HIGH)], {}, [(CUT, 2, None)]),
        ([finding(Kind.RATIO_HIGH, severity=Severity.CRITICAL)], {}, [(CUT, 5, None)]),
        ([finding(Kind.RATIO_HIGH)], {"warmup": True}, []),
        ([finding(Kind.RATIO_HIGH)], {"warmup": True, "rising": False}, [(CUT, 2, None)]),
        ([finding(Kind.SLOW_PROGRESS, severity=Severity.INFO)], {}, [(ADVICE, None, None)]),
        ([finding(Kind.SLOW_PROGRESS, severity=Severity.INFO)], {"warmup": True}, []),
        ([finding(Kind.RATIO_LOW, severity=Severity.INFO)], {}, [(ADVICE, None, None)]),
        ([finding(Kind.RATIO_LOW)], {"warmup": True}, []),
        ([finding(Kind.OVERFIT)], {}, []),
        ([], {}, []),
        (
            [finding(Kind.PLATEAU), finding(Kind.NONFINITE, severity=Severity.CRITICAL)],
            {},
            [(CUT, 10, None), (CLIP, None, 1.0)],
        ),
        (
            [finding(Kind.RATIO_HIGH), finding(Kind.OSCILLATION, mild=True)],
            {},
            [(CUT, 5, None)],
        ),
        ([finding(Kind.RATIO_LOW), finding(Kind.PLATEAU)], {}, [(CUT, 2, None)]),
        (
            [finding(Kind.NONFINITE)],
            {"lr": 1e-3, "policy": {"min_lr": 3e-4}},
            [(CUT, 2, None), (CLIP, None, 1.0)],
        ),
        ([finding(Kind.PLATEAU)], {"lr": 3e-4, "policy": {"min_lr": 3e-4}}, []),
        ([finding(Kind.OSCILLATION)], {"lr": 1e-3, "policy": {"min_lr": 1e-4}}, [(CUT, 10, None)]),
    ],
    ids=[
        "plateau-halves",
        "no-plateau-cut-in-warmup",
        "oscillation-cuts-by-10",
        "mild-oscillation-cuts-by-5",
        "oscillation-in-warmup-still-cuts",
        "explosion-warning-cuts-by-5-and-clips-at-p90",
        "explosion-critical-cuts-by-10-and-clips",
        "grad-norm-window-as-steps-values-pair",
        "nonfinite-cuts-by-10-and-clips-at-fallback",
        "ratio-high-warning-halves",
        "ratio-high-critical-cuts-by-5",
        "no-ratio-high-cut-in-warmup",
        "ratio-high-cut-in-a-decay",
        "slow-progress-advises-raising",
        "no-slow-progress-advice-in-warmup",
        "ratio-low-advises-raising",
        "no-raise-advice-in-warmup",
        "one-overfit-report-is-not-a-stop",
        "nothing-found-nothing-done",
        "nonfinite-beats-plateau",
        "oscillation-and-ratio-high-one-cut",
        "a-cut-beats-advice",
        "floor-shrinks-cut-10-to-2",
        "at-the-floor-no-cut",
        "floor-allows-landing-on-min-lr",
    ],
)
def test_policy_decides(
    findings: list[Finding], kwargs: dict[str, Any], expected: list[tuple[Any, ...]]
) -> None:
    policy = Policy(**kwargs.pop("policy", {}))
    decisions = policy.decide(1000, findings, **kwargs)
    assert brief(decisions) == expected
    for d in decisions:
        assert d.step == 1000 and d.reason and d.findings
        assert all(any(f is g for g in findings) for f in d.findings)
        json.dumps(d.to_json(), allow_nan=False)


def test_policy_reasons_should_name_the_factor_and_why() -> None:
    for kind, severity, mild, factor in [
        (Kind.PLATEAU, Severity.INFO, False, 2),
        (Kind.OSCILLATION, Severity.WARNING, False, 10),
        (Kind.OSCILLATION, Severity.WARNING, True, 5),
        (Kind.EXPLOSION, Severity.WARNING, False, 5),
        (Kind.EXPLOSION, Severity.CRITICAL, False, 10),
        (Kind.NONFINITE, Severity.CRITICAL, False, 10),
    ]:
        f = finding(kind, severity=severity, mild=mild)
        cut, *rest = Policy().decide(1000, [f], lr=0.1, grad_norms=NORMS)
        assert cut.factor == factor and f"Cut the LR by {factor}:" in cut.reason
        assert kind.value in cut.reason and f"LR 0.1 -> {0.1 / factor:.3g}" in cut.reason
        for clip in rest:
            assert f"max_norm={clip.max_norm:.3g}" in clip.reason
            assert f"together with the cut by {factor}" in clip.reason
    nan_cut = Policy().decide(1, [finding(Kind.NONFINITE)])[0]
    assert "checkpoint" in nan_cut.reason
    limited = Policy(min_lr=3e-4).decide(1, [finding(Kind.NONFINITE)], lr=1e-3)[0]
    assert "Cut the LR by 2 (10 would take the LR below min_lr=0.0003)" in limited.reason


def test_policy_decision_json_should_have_the_analyze_shape() -> None:
    cut, clip = Policy().decide(7, [finding(Kind.EXPLOSION)], grad_norms=NORMS)
    assert list(cut.to_json()) == ["step", "action", "factor", "reason", "findings"]
    assert list(clip.to_json()) == ["step", "action", "max_norm", "reason", "findings"]
    assert cut.to_json()["action"] == "lr_cut" and clip.to_json()["action"] == "clip"


def run(
    policy: Policy, events: list[tuple[int, list[Finding]]], **kw: Any
) -> list[tuple[Any, ...]]:
    """Feed (step, findings) in order; (step, action, factor) of every decision."""
    return [(d.step, d.action, d.factor) for s, fs in events for d in policy.decide(s, fs, **kw)]


def test_policy_should_wait_out_its_cooldown() -> None:
    p = Policy(cooldown_steps=200)
    plateau = [finding(Kind.PLATEAU)]
    got = run(p, [(100, plateau), (150, plateau), (299, plateau), (300, plateau)])
    assert got == [(100, CUT, 2), (300, CUT, 2)]
    assert p.in_cooldown(499) and not p.in_cooldown(500)


def test_policy_should_let_a_stronger_finding_act_during_a_cooldown() -> None:
    p = Policy(cooldown_steps=200)
    events = [
        (100, [finding(Kind.PLATEAU)]),
        (120, [finding(Kind.OSCILLATION, mild=True)]),
        (130, [finding(Kind.OSCILLATION)]),  # same rank: waits
        (150, [finding(Kind.EXPLOSION)]),
        (160, [finding(Kind.NONFINITE)]),
        (170, [finding(Kind.NONFINITE)]),  # same rank: waits
    ]
    got = run(p, events)
    assert [(s, f) for s, a, f in got if a is CUT] == [(100, 2), (120, 5), (150, 5), (160, 10)]


def test_policy_advice_should_be_rare_and_start_no_cooldown() -> None:
    p = Policy(cooldown_steps=100)
    low = [finding(Kind.RATIO_LOW)]
    events = [(0, low), (1, [finding(Kind.PLATEAU)]), (500, low), (600, [finding(Kind.PLATEAU)])]
    events += [(650, low), (999, low), (1000, low)]
    got = run(p, events)
    assert got == [(0, ADVICE, None), (1, CUT, 2), (600, CUT, 2), (1000, ADVICE, None)]


def _torch_and_policy(patience: int, checks: int) -> tuple[list[float], list[Decision]]:
    """A flat metric through torch's scheduler and through tracker -> policy, side by side."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=patience, min_lr=0.0, eps=0.0
    )
    tracker = PlateauTracker(patience=patience, semantics="torch")
    policy = Policy(cooldown_steps=0)
    torch_lrs, decisions = [], []
    for step in range(checks):
        sched.step(1.0)
        torch_lrs.append(opt.param_groups[0]["lr"])
        f = tracker.update(step, 1.0, tag="val/loss")
        decisions += policy.decide(step, [] if f is None else [f], lr=None)
    return torch_lrs, decisions


def test_policy_should_stop_after_ten_halvings_of_torchs_schedule() -> None:
    torch_lrs, decisions = _torch_and_policy(patience=2, checks=40)
    cuts = [d for d in decisions if d.action is CUT]
    assert len(cuts) == 10 and all(d.factor == 2 for d in cuts)
    lr = 1.0
    for d in cuts:  # apply each cut: the LR after it is exactly torch's
        lr /= d.factor or 1
        assert lr == torch_lrs[d.step]
    assert lr == 1.0 / 1024
    assert decisions[-1].action is STOP and "max_total_cut=1024" in decisions[-1].reason
    assert torch_lrs[decisions[-1].step] == 1.0 / 2048  # torch would have halved an 11th time
    assert len(decisions) == 11


def test_policy_budget_should_shrink_a_cut_that_would_overshoot() -> None:
    p = Policy(cooldown_steps=0, max_total_cut=1024)
    p.record_applied(lr_factor=512)
    (cut, _clip) = p.decide(1, [finding(Kind.NONFINITE)])
    assert cut.factor == 2 and "would exceed max_total_cut" in cut.reason
    assert p.total_cut == 1024
    assert brief(p.decide(2, [finding(Kind.PLATEAU)])) == [(STOP, None, None)]
    assert p.stopped and p.decide(3, [finding(Kind.NONFINITE)]) == []


def test_policy_should_stop_when_nonfinite_values_persist_after_cuts() -> None:
    p = Policy(cooldown_steps=100, nonfinite_max_cuts=2)
    nan = [finding(Kind.NONFINITE, severity=Severity.CRITICAL)]
    got = run(p, [(s, nan) for s in range(1000, 1400, 10)])
    assert [(s, a) for s, a, _ in got] == [(1000, CUT), (1000, CLIP), (1100, CUT), (1200, STOP)]
    stop = p.decide(1500, nan)
    assert stop == [] and p.stopped


def test_policy_nonfinite_episodes_far_apart_should_not_add_up_to_a_stop() -> None:
    p = Policy(cooldown_steps=100, nonfinite_max_cuts=1)
    nan = [finding(Kind.NONFINITE)]
    got = run(p, [(1000, nan), (5000, nan)], grad_norms=NORMS)
    assert [(s, a) for s, a, _ in got] == [(1000, CUT), (1000, CLIP), (5000, CUT)]
    assert not p.stopped


def test_policy_stop_reason_should_advise_resuming_from_a_checkpoint() -> None:
    p = Policy(cooldown_steps=10, nonfinite_max_cuts=1)
    p.decide(0, [finding(Kind.NONFINITE)])
    (stop,) = p.decide(10, [finding(Kind.NONFINITE)])
    assert stop.action is STOP and "last good checkpoint" in stop.reason


def test_policy_should_stop_when_overfitting_persists() -> None:
    p = Policy(cooldown_steps=100, overfit_patience=3)

    def over(step: int) -> list[Finding]:
        return [finding(Kind.OVERFIT, step=step)]

    assert run(p, [(100, over(100)), (200, over(200))]) == []
    assert run(p, [(300, over(300))]) == [(300, STOP, None)]


def test_policy_overfit_streak_should_break_on_a_quiet_check() -> None:
    p = Policy(overfit_patience=2)
    events = [
        (100, [finding(Kind.OVERFIT, step=100)]),
        (100, [finding(Kind.OVERFIT, step=100)]),  # the same report again: not a new check
        (150, []),
        (200, [finding(Kind.OVERFIT, step=200)]),
    ]
    assert run(p, events) == []
    assert run(p, [(300, [finding(Kind.OVERFIT, step=300)])]) == [(300, STOP, None)]


def test_policy_overfit_stop_should_wait_for_a_cuts_cooldown() -> None:
    p = Policy(cooldown_steps=500, overfit_patience=2)
    both = [finding(Kind.OVERFIT, step=100), finding(Kind.PLATEAU, step=100)]
    assert run(p, [(100, both)]) == [(100, CUT, 2)]
    assert run(p, [(200, [finding(Kind.OVERFIT, step=200)])]) == []
    assert run(p, [(600, [finding(Kind.OVERFIT, step=600), finding(Kind.PLATEAU)])]) == [
        (600, STOP, None)
    ]


def test_policy_should_not_reissue_a_clip_looser_than_the_one_in_force() -> None:
    p = Policy(cooldown_steps=10)
    first = p.decide(0, [finding(Kind.EXPLOSION)], grad_norms=NORMS)
    looser = p.decide(20, [finding(Kind.EXPLOSION)], grad_norms=NORMS * 10)
    tighter = p.decide(40, [finding(Kind.EXPLOSION)], grad_norms=NORMS / 10)
    assert brief(first) == [(CUT, 5, None), (CLIP, None, P90R)]
    assert brief(looser) == [(CUT, 5, None)]
    assert [d.action for d in tighter] == [CUT, CLIP]
    assert tighter[1].max_norm == pytest.approx(P90 / 10)


def test_policy_should_treat_a_nonfinite_lr_as_unknown() -> None:
    p = Policy(min_lr=1e-4)
    (cut,) = p.decide(5, [finding(Kind.PLATEAU)], lr=float("nan"))
    assert cut.factor == 2 and "LR nan" not in cut.reason and p.start_lr is None


def test_policy_start_lr_should_be_the_first_lr_after_warmup() -> None:
    p = Policy()
    p.decide(0, [], lr=1e-5, warmup=True)
    assert p.start_lr is None
    p.decide(10, [], lr=1e-3)
    p.decide(20, [finding(Kind.PLATEAU)], lr=1e-3)
    p.decide(30, [], lr=5e-4)
    assert p.start_lr == 1e-3 and p.total_cut == 2


def test_policy_state_should_round_trip_and_continue_identically() -> None:
    rng = np.random.default_rng(1)
    kinds = [Kind.PLATEAU, Kind.OVERFIT, Kind.NONFINITE, Kind.RATIO_LOW, Kind.OSCILLATION]
    events = []
    for step in range(0, 6000, 50):
        picked = [k for k in kinds if rng.random() < 0.15]
        events.append((step, [finding(k, step=step) for k in picked]))
    whole, first = Policy(cooldown_steps=120), Policy(cooldown_steps=120)
    expected = [brief(whole.decide(s, fs, lr=1.0, grad_norms=NORMS)) for s, fs in events]
    got = [brief(first.decide(s, fs, lr=1.0, grad_norms=NORMS)) for s, fs in events[:60]]
    resumed = Policy(cooldown_steps=120)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += [brief(resumed.decide(s, fs, lr=1.0, grad_norms=NORMS)) for s, fs in events[60:]]
    assert got == expected and any(expected)
    assert resumed.state_dict() == whole.state_dict()


def test_policy_load_state_dict_should_refuse_foreign_keys() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        Policy().load_state_dict({"best": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"cooldown_steps": -1}, "cooldown_steps"),
        ({"cooldown_steps": 1.5}, "cooldown_steps"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"max_total_cut": 1.0}, "max_total_cut"),
        ({"clip_percentile": 0}, "clip_percentile"),
        ({"fallback_max_norm": 0.0}, "fallback_max_norm"),
        ({"overfit_patience": 0}, "overfit_patience"),
        ({"nonfinite_max_cuts": -1}, "nonfinite_max_cuts"),
        ({"min_grad_norms": 0}, "min_grad_norms"),
    ],
    ids=lambda x: str(x),
)
def test_policy_should_reject_bad_settings(kwargs: dict[str, Any], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        Policy(**kwargs)


def test_policy_should_say_why_a_warning_in_the_cooldown_led_to_no_decision() -> None:
    p = Policy(cooldown_steps=100)
    spike = Finding(Kind.EXPLOSION, 10, "lrwatch/loss", Severity.WARNING, {})
    assert p.decide(10, [spike], lr=0.1) and p.unanswered == []
    again = Finding(Kind.EXPLOSION, 60, "lrwatch/loss", Severity.WARNING, {})
    assert p.decide(60, [again], lr=0.02) == []
    [(f, why)] = p.unanswered
    assert f is again and why.startswith("cooldown: the last action was at step 10, 50 of 100")
    info = Finding(Kind.PLATEAU, 70, "val/loss", Severity.INFO, {})
    p.decide(70, [info], lr=0.02)
    assert p.unanswered == []  # info findings need no excuse


def test_policy_should_leave_gentle_cuts_to_a_schedule_about_to_cut_but_not_explosions() -> None:
    soon = "the schedule cuts the LR itself in ~3 steps (every 150)"
    high = Finding(Kind.RATIO_HIGH, 297, "lrwatch/update_ratio", Severity.WARNING, {})
    p = Policy()
    assert p.decide(297, [high], lr=0.1, defer=soon) == []
    assert p.unanswered[0][1] == f"left to the schedule: {soon}"
    assert [d.factor for d in Policy().decide(297, [high], lr=0.1)] == [2]  # without: a cut
    boom = Finding(Kind.EXPLOSION, 298, "lrwatch/grad_norm", Severity.CRITICAL, {})
    assert [d.action.value for d in p.decide(298, [boom], lr=0.1, defer=soon)] == ["lr_cut", "clip"]


def test_policy_should_cut_again_when_a_divergence_outlasts_the_settling_time() -> None:
    """An explosion's cut by 10 leaves the loss stuck far above its start: the divergence
    escalates past the 200-step cooldown once ``settle_steps`` have passed, and each further
    cut needs its own settling time; the cut budget then ends the run with a stop."""
    p = Policy(cooldown_steps=200, settle_steps=20, max_total_cut=1000)
    div = [finding(Kind.DIVERGENCE, severity=Severity.CRITICAL)]
    events = [
        (10, [finding(Kind.EXPLOSION, severity=Severity.CRITICAL)]),
        (20, div),  # 10 steps after the cut: still settling
        (29, div),
        (30, div),  # 20 steps: escalate
        (40, div),  # settling after the second cut
        (50, div),
        (70, div),  # a fourth cut by 10 would pass the 1000x budget: stop
    ]
    got = run(p, events, lr=1.0)
    assert [(s, a) for s, a, _ in got] == [
        (10, CUT),
        (10, ActionKind.CLIP),
        (30, CUT),
        (50, CUT),
        (70, ActionKind.STOP),
    ]


def test_policy_should_not_escalate_on_other_findings_during_a_cooldown() -> None:
    p = Policy(cooldown_steps=200, settle_steps=20)
    crit = [finding(Kind.EXPLOSION, severity=Severity.CRITICAL)]
    got = run(p, [(10, crit), (40, crit), (100, crit)], lr=1.0)
    assert [s for s, a, _ in got if a is CUT] == [10]


def test_policy_should_cut_by_ten_and_roll_back_a_run_too_hot_from_its_first_steps() -> None:
    """An early critical update ratio (loss not falling): cut by 10 and back to the window's
    first step; still there after settle_steps: again, past the 200-step cooldown."""
    p = Policy(cooldown_steps=200, settle_steps=20)
    hot = [finding(Kind.RATIO_HIGH, severity=Severity.CRITICAL, early=True, last_good=1)]
    out = [
        (d.step, d.action, d.factor, d.to_step)
        for s in (12, 20, 40)
        for d in p.decide(s, hot, lr=1.0)
    ]
    assert out == [
        (12, CUT, 10, None),
        (12, ActionKind.ROLLBACK, None, 1),
        (40, CUT, 10, None),
        (40, ActionKind.ROLLBACK, None, 1),
    ]
    late = [finding(Kind.RATIO_HIGH, severity=Severity.CRITICAL)]  # a full-window verdict
    assert [(d.action, d.factor) for d in Policy().decide(500, late, lr=1.0)] == [(CUT, 5)]


def test_policy_should_say_why_findings_beside_a_lost_models_answer_led_to_nothing() -> None:
    """Three non-finite findings at one step (loss, grad norm, flag): the loss's answers the
    run with a rollback; the other two must say why they led to no decision of their own."""
    p = Policy(nonfinite_stuck=10)
    loss = finding(
        Kind.NONFINITE, severity=Severity.CRITICAL, role="loss", consecutive=10, last_good=5
    )
    others = [finding(Kind.NONFINITE, severity=Severity.CRITICAL) for _ in range(2)]
    [back] = p.decide(34, [loss, *others])
    assert back.action is ActionKind.ROLLBACK
    assert [why for _, why in p.unanswered] == [
        "the rollback at this step answers the run as a whole"
    ] * 2
