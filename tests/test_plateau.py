"""Plateau detectors: torch's decisions on demand, lrwatch's fixes by default, the trend test."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lrwatch import schema
from lrwatch.analysis.detectors.plateau import PlateauTracker, PlateauTrend
from lrwatch.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Differential test: semantics="torch" against torch.optim.lr_scheduler.ReduceLROnPlateau
# --------------------------------------------------------------------------------------------


def _torch_trace(cfg: dict[str, Any], lr: float, values: list[float]) -> list[tuple[Any, ...]]:
    """Run torch's scheduler; per check: (reduced?, lr, best, num_bad, cooldown_counter)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **cfg)
    reductions: list[int] = []
    real_reduce = sched._reduce_lr

    def recording_reduce(epoch: int) -> None:  # records the decision, then lets torch act
        reductions.append(epoch)
        real_reduce(epoch)

    sched._reduce_lr = recording_reduce  # type: ignore[method-assign]
    trace = []
    for i, v in enumerate(values):
        sched.step(v)
        lr_now = opt.param_groups[0]["lr"]
        reduced = bool(reductions) and reductions[-1] == i + 1
        trace.append((reduced, lr_now, sched.best, sched.num_bad_epochs, sched.cooldown_counter))
    return trace


def _our_trace(cfg: dict[str, Any], lr: float, values: list[float]) -> list[tuple[Any, ...]]:
    t = PlateauTracker(**cfg, lr=lr, semantics="torch")
    trace = []
    for i, v in enumerate(values):
        found = t.update(i, v, tag="val/loss") is not None
        trace.append((found, t.lr, t.best, t.num_bad_checks, t.cooldown_counter))
    return trace


def _same(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    """Equal traces, NaN equal to NaN (a NaN best is torch's own value after a NaN check)."""
    flat_a = [x for row in a for x in row]
    flat_b = [x for row in b for x in row]
    return all(x == y or (x != x and y != y) for x, y in zip(flat_a, flat_b, strict=True))


def _random_config(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "mode": str(rng.choice(["min", "max"])),
        "patience": int(rng.integers(0, 5)),
        "threshold": float(rng.choice([0.0, 1e-4, 0.01, 0.1, 0.5, 1.0, 2.0])),
        "threshold_mode": str(rng.choice(["rel", "abs"])),
        "cooldown": int(rng.integers(0, 4)),
        "factor": float(rng.choice([0.1, 0.5, 0.9, 0.0])),
        "min_lr": float(rng.choice([0.0, 1e-4, 0.05])),
        "eps": float(rng.choice([1e-8, 1e-3, 0.0, 0.5, 0.05])),  # 0.5, 0.05: exact ties
    }


def _random_series(rng: np.random.Generator, n: int) -> list[float]:
    shape = rng.integers(0, 6)
    if shape == 0:  # random walk, either sign
        x = np.cumsum(rng.standard_normal(n)) + rng.normal(0, 5)
    elif shape == 1:  # constant runs: exact ties with the best
        x = np.repeat(rng.normal(0, 2, size=n // 5 + 1), 5)[:n]
    elif shape == 2:  # slow descent by about the threshold: decisions hinge on it
        x = 1.0 * (1 - rng.choice([1e-4, 0.01, 0.1])) ** np.arange(n) * rng.choice([1, -1])
    elif shape == 3:  # few distinct values: many ties
        x = rng.integers(-3, 4, size=n).astype(np.float64)
    elif shape == 4:  # noisy plateau around a negative value
        x = -2.0 + 0.01 * rng.standard_normal(n)
    else:  # values spanning magnitudes
        x = rng.lognormal(0, 3, size=n) * rng.choice([1, -1], size=n)
    out = [float(v) for v in x]
    for _ in range(int(rng.integers(0, 3))):  # NaN and Inf holes
        out[int(rng.integers(0, n))] = float(rng.choice([math.nan, math.inf, -math.inf]))
    return out


def test_plateau_tracker_should_take_torchs_decisions_on_random_sequences() -> None:
    rng = np.random.default_rng(20240513)
    for case in range(300):
        cfg, lr = _random_config(rng), float(rng.choice([1.0, 0.1, 3e-4]))
        values = _random_series(rng, int(rng.integers(1, 40)))
        expected, got = _torch_trace(cfg, lr, values), _our_trace(cfg, lr, values)
        assert _same(expected, got), f"case {case}: {cfg} lr={lr} values={values}"


_metric = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.0001, 0.9999]),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(_metric, min_size=1, max_size=25),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    patience=st.integers(0, 3),
    cooldown=st.integers(0, 2),
    threshold=st.sampled_from([0.0, 1e-4, 0.1, 1.0]),
)
def test_plateau_tracker_should_match_torch_on_arbitrary_floats(
    values: list[float],
    mode: str,
    threshold_mode: str,
    patience: int,
    cooldown: int,
    threshold: float,
) -> None:
    cfg = {
        "mode": mode,
        "threshold_mode": threshold_mode,
        "patience": patience,
        "cooldown": cooldown,
        "threshold": threshold,
        "factor": 0.5,
        "min_lr": 1e-3,
        "eps": 1e-8,
    }
    assert _same(_torch_trace(cfg, 1.0, values), _our_trace(cfg, 1.0, values))


def test_plateau_tracker_torch_semantics_should_reach_torchs_lr_after_ten_halvings() -> None:
    values = [1.0] * 200
    cfg = {"patience": 3, "factor": 0.5, "min_lr": 0.0, "eps": 1e-12}
    ours, theirs = _our_trace(cfg, 1.0, values), _torch_trace(cfg, 1.0, values)
    assert _same(ours, theirs)
    assert sum(row[0] for row in ours) >= 10


# --------------------------------------------------------------------------------------------
# lrwatch semantics: the three traps
# --------------------------------------------------------------------------------------------


def _fires(values: list[float], **cfg: Any) -> list[int]:
    t = PlateauTracker(**cfg)
    return [i for i, v in enumerate(values) if t.update(i, v, tag="m") is not None]


SPIKE_RECOVERY = [
    *[2.0 * 0.9**i for i in range(15)],  # descent to a best of ~0.46
    3.0,  # the spike
    *[0.4 + 2.4 * 0.8**i for i in range(1, 20)],  # steady recovery, above the old best for ~11
]


@pytest.mark.parametrize(
    ("values", "cfg", "expected"),
    [
        ([3, 2, 2, 2, 2], {"patience": 2}, [3]),
        ([3, 2, 2, 2, 2], {"patience": 2, "semantics": "torch"}, [4]),
        ([3, 2, 2, 2, 2, 2, 2], {"patience": 1}, [2, 3, 4, 5, 6]),
        ([1, 2, 3, 4, 5], {"patience": 2, "mode": "max"}, []),
        ([5, 4, 4, 4, 4, 4, 4, 4], {"patience": 2, "cooldown": 2}, [3, 7]),
        (
            [-1.0, -1.0009, -1.0, -1.0009, -1.0, -1.0009],
            {"patience": 3, "threshold": 1e-3},
            [3],
        ),
        (
            [-1.0, -1.0009, -1.0, -1.0009, -1.0, -1.0009],
            {"patience": 3, "threshold": 1e-3, "semantics": "torch"},
            [],
        ),
        ([-1.0, -1.5, -2.0, -2.5, -3.0], {"patience": 2, "threshold": 0.1}, []),
        ([-3.0, -2.5, -2.0, -2.0], {"patience": 2, "mode": "max"}, []),
        ([-3.0, -3.001, -3.0, -3.001], {"patience": 2, "mode": "max", "threshold": 1e-2}, [2]),
        (SPIKE_RECOVERY, {"patience": 5}, []),
        (SPIKE_RECOVERY, {"patience": 4, "semantics": "torch"}, [19, 24, 29]),
        ([2.0, 1.0, *([math.nan] * 10), 1.0, 1.0], {"patience": 2}, [13]),
        ([2.0, 1.0, *([math.nan] * 3)], {"patience": 2, "semantics": "torch"}, [4]),
        ([math.inf, math.inf, 1.0], {"patience": 1}, []),
    ],
    ids=[
        "fires-on-the-patience-th-bad-check",
        "torch-fires-one-check-later",
        "patience-1-fires-on-every-bad-check",
        "max-mode-rising-never-fires",
        "cooldown-in-checks",
        "negative-flat-metric-is-a-plateau",
        "torch-calls-a-worse-negative-value-better-47513",
        "negative-descent-is-progress",
        "max-mode-negative-rise-then-one-flat-check",
        "max-mode-negative-flat-is-a-plateau",
        "steady-recovery-after-spike-is-not-a-plateau-30873",
        "torch-calls-the-recovery-a-plateau-30873",
        "nan-checks-are-skipped",
        "torch-counts-nan-as-bad",
        "inf-checks-are-skipped",
    ],
)
def test_plateau_tracker_fires_at(
    values: list[float], cfg: dict[str, Any], expected: list[int]
) -> None:
    assert _fires([float(v) for v in values], **cfg) == expected


def test_plateau_tracker_should_fire_when_the_recovery_stalls_above_the_old_best() -> None:
    stalled = [*SPIKE_RECOVERY[:22], *([SPIKE_RECOVERY[21]] * 10)]
    assert min(SPIKE_RECOVERY[:15]) < SPIKE_RECOVERY[21]  # still above the old best
    assert _fires(stalled, patience=5) == [26, 31]


def test_plateau_tracker_should_detect_a_noisy_plateau_nearly_as_fast_as_torch() -> None:
    rng = np.random.default_rng(7)
    ours, torchs = [], []
    for _ in range(100):
        values = [*(1 + np.exp(-np.arange(20) / 5)), *(1 + 0.01 * rng.standard_normal(300))]
        ours.append(_fires(values, patience=5, threshold=1e-4)[0])
        torchs.append(_fires(values, patience=4, threshold=1e-4, semantics="torch")[0])
    # The recovery rule costs some delay on pure noise; bound it at 1.5x torch's median.
    assert np.median(ours) <= 1.5 * np.median(torchs)


def test_plateau_tracker_finding_should_carry_its_evidence() -> None:
    t = PlateauTracker(patience=2, lr=0.1, factor=0.5)
    found = [t.update(s, v, tag="val/loss") for s, v in enumerate([3.0, 2.0, 2.5, 2.6])]
    f = found[-1]
    assert f is not None and found[:3] == [None, None, None]
    assert (f.kind, f.step, f.tag, f.severity) == (
        schema.Kind.PLATEAU,
        3,
        "val/loss",
        schema.Severity.INFO,
    )
    assert f.evidence["best"] == 2.0 and f.evidence["value"] == 2.6
    assert f.evidence["num_bad_checks"] == 2 and f.evidence["patience"] == 2
    assert (f.evidence["lr"], f.evidence["new_lr"]) == (0.1, 0.05)
    assert "2 checks" in f.message
    json.dumps(f.to_json(), allow_nan=False)


def test_plateau_tracker_state_should_round_trip_through_json() -> None:
    rng = np.random.default_rng(3)
    values = [float(v) for v in np.cumsum(rng.standard_normal(80))]
    cfg: dict[str, Any] = {"patience": 3, "cooldown": 2, "lr": 1.0, "threshold": 0.01}
    whole = PlateauTracker(**cfg)
    first = PlateauTracker(**cfg)
    expected = [whole.update(i, v, tag="m") for i, v in enumerate(values)]
    got = [first.update(i, v, tag="m") for i, v in enumerate(values[:40])]
    resumed = PlateauTracker(**cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += [resumed.update(i, v, tag="m") for i, v in enumerate(values[40:], start=40)]
    assert got == expected
    assert resumed.state_dict() == whole.state_dict()


def test_plateau_tracker_fresh_state_should_round_trip_with_infinite_best() -> None:
    t = PlateauTracker(mode="max")
    state = json.loads(json.dumps(t.state_dict(), allow_nan=False))
    u = PlateauTracker(mode="max")
    u.load_state_dict(state)
    assert u.best == -math.inf and u.state_dict() == t.state_dict()


@pytest.mark.parametrize(
    ("cfg", "fix"),
    [
        ({"mode": "lowest"}, "mode"),
        ({"threshold_mode": "relative"}, "threshold_mode"),
        ({"patience": 0}, "patience"),
        ({"patience": -1, "semantics": "torch"}, "patience"),
        ({"threshold": -0.1}, "threshold"),
        ({"factor": 2.0}, "factor"),
        ({"cooldown": -1}, "cooldown"),
        ({"semantics": "keras"}, "semantics"),
        ({"lr": math.nan}, "lr"),
    ],
    ids=lambda x: str(x),
)
def test_plateau_tracker_should_reject_bad_settings(cfg: dict[str, Any], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        PlateauTracker(**cfg)


# --------------------------------------------------------------------------------------------
# PlateauTrend: the noise-aware rule for per-step training loss
# --------------------------------------------------------------------------------------------

RNG = np.random.default_rng(11)
STEPS = np.arange(1000)
FLAT = 2.0 + 0.01 * RNG.standard_normal(1000)
DESCENT = 3.0 * np.exp(-STEPS / 500) + 0.3 * RNG.standard_normal(1000)
SLOW_REAL = 2.0 - 1e-5 * STEPS + 0.001 * RNG.standard_normal(1000)  # -0.25%/500 steps, sure
RISING = 2.0 + 1e-3 * STEPS + 0.05 * RNG.standard_normal(1000)
ACCURACY = 0.5 + 0.3 * (1 - np.exp(-STEPS / 300)) + 0.02 * RNG.standard_normal(1000)


@pytest.mark.parametrize(
    ("values", "cfg", "plateau"),
    [
        (FLAT, {}, True),
        (DESCENT, {}, False),
        (SLOW_REAL, {}, False),
        (SLOW_REAL, {"alpha": 1e-300}, True),
        (RISING, {}, True),
        (ACCURACY, {"mode": "max"}, False),
        (FLAT, {"mode": "max"}, True),
        (-FLAT, {}, True),
        (-DESCENT, {"mode": "max"}, False),
    ],
    ids=[
        "flat-noise",
        "noisy-descent",
        "slow-but-significant-descent-is-progress",
        "tiny-descent-without-significance-is-a-plateau",
        "rising-loss-is-no-progress",
        "rising-accuracy",
        "flat-accuracy",
        "flat-negative-metric",
        "negative-metric-rising-in-max-mode",
    ],
)
def test_plateau_trend_verdict(
    values: np.ndarray[Any, Any], cfg: dict[str, Any], plateau: bool
) -> None:
    found = PlateauTrend(**cfg).check(STEPS, values, tag="lrwatch/loss")
    assert (found is not None) is plateau


@pytest.mark.parametrize(
    ("steps", "values"),
    [
        (np.arange(0), np.zeros(0)),
        (np.arange(10), 2.0 + 0.01 * np.arange(10)),
        (np.arange(100), np.full(100, 2.0)),
        (np.arange(100), np.r_[FLAT[:99], math.nan]),
        (np.arange(100), np.r_[FLAT[:99], math.inf]),
        (np.full(100, 7), FLAT[:100]),
        (np.arange(100), np.r_[np.full(90, math.nan), FLAT[:10]]),
    ],
    ids=[
        "empty",
        "too-short",
        "constant",
        "nan-at-the-last-step",
        "inf-at-the-last-step",
        "one-step-repeated",
        "mostly-nan",
    ],
)
def test_plateau_trend_should_give_no_verdict_on_degenerate_windows(
    steps: np.ndarray[Any, Any], values: np.ndarray[Any, Any]
) -> None:
    assert PlateauTrend().check(steps, values, tag="lrwatch/loss") is None


def test_plateau_trend_should_skip_nan_holes_and_repeated_steps() -> None:
    values = FLAT.copy()
    values[::17] = math.nan
    steps = np.sort(np.r_[STEPS[:-50], STEPS[-100:-50]])  # a restarted trainer re-logs steps
    assert PlateauTrend().check(STEPS, values, tag="l") is not None
    assert PlateauTrend().check(steps, FLAT, tag="l") is not None


def test_plateau_trend_evidence_should_match_scipy() -> None:
    window = 120  # <= 128 points: no block means, scipy sees the same points
    found = PlateauTrend(window=window).check(STEPS, FLAT, tag="lrwatch/loss")
    assert found is not None and found.step == 999 and found.kind is schema.Kind.PLATEAU
    x, y = STEPS[-window:].astype(np.float64), FLAT[-window:]
    tau = stats.kendalltau(x, y, alternative="less")
    ev = found.evidence
    assert ev["points"] == window
    assert ev["tau"] == pytest.approx(tau.statistic) and ev["p_value"] == pytest.approx(tau.pvalue)
    assert ev["slope"] == pytest.approx(stats.theilslopes(y, x).slope)
    assert ev["improvement"] == pytest.approx(-ev["slope"] * (window - 1) / np.median(y))
    assert ev["best"] == y.min() and ev["p_value"] >= ev["alpha"]
    json.dumps(found.to_json(), allow_nan=False)


def test_plateau_trend_should_average_long_windows_into_blocks() -> None:
    steps = np.arange(5000)
    values = 2.0 + 0.01 * np.random.default_rng(5).standard_normal(5000)
    found = PlateauTrend(window=5000).check(steps, values, tag="l")
    assert found is not None and found.step == 4999
    assert found.evidence["points"] == 5000 and found.evidence["blocks"] == 125
    x, y = steps.reshape(-1, 40).mean(axis=1), values.reshape(-1, 40).mean(axis=1)
    assert found.evidence["slope"] == pytest.approx(stats.theilslopes(y, x).slope)


def test_plateau_trend_should_keep_the_significance_of_slow_progress_in_long_windows() -> None:
    # 0.5% gain per 1000 steps under 1% per-step noise (z ~ 4.5): real progress, not a plateau.
    rng = np.random.default_rng(9)
    steps = np.arange(1000)
    called = 0
    for _ in range(20):
        values = 2.0 - 1e-5 * steps + 0.02 * rng.standard_normal(1000)
        called += PlateauTrend().check(steps, values, tag="l") is not None
    assert called <= 1


@pytest.mark.parametrize(
    "cfg",
    [
        {"mode": "down"},
        {"window": 10},
        {"min_points": 2},
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"min_improvement": -1.0},
    ],
    ids=lambda c: str(c),
)
def test_plateau_trend_should_reject_bad_settings(cfg: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        PlateauTrend(**cfg)
