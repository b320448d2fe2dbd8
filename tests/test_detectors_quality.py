"""Detection-quality rules: the numpy Kendall test, the full-window ratio rule, the explosion
trend rule, the oscillation fall-versus-band rule, and how the analyzer treats its own cuts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lrwatch import schema
from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.analysis.config import load_config
from lrwatch.analysis.detectors._window import kendall, theil_sen
from lrwatch.analysis.detectors.explosion import ExplosionDetector
from lrwatch.analysis.detectors.oscillation import OscillationDetector
from lrwatch.analysis.detectors.ratio import RatioDetector
from lrwatch.policy.policy import Policy
from lrwatch.schema import ActionKind, Finding, Kind, Scalar, Severity


# ---------------------------------------------------------------------------------- kendall
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_kendall_matches_scipy_kendalltau(seed: int, alternative: str) -> None:
    """scipy.stats.kendalltau is the oracle: tau-b and p, with and without ties, sorted or
    shuffled x, from 10 points (scipy's exact range) to 400 (the oscillation window)."""
    rng = np.random.default_rng(seed)
    for n in (10, 33, 34, 57, 100, 250, 400):
        x = np.arange(n, dtype=np.float64)
        if seed % 2:
            x = rng.permutation(x)
        y = rng.standard_normal(n) + rng.uniform(-0.02, 0.02) * np.arange(n)
        if seed >= 3:
            y = np.round(y, 1)  # ties in y
        if seed == 5:
            x = np.round(rng.standard_normal(n), 1)  # ties in x too
        got = kendall(x, y, alternative=alternative)
        ref = stats.kendalltau(x, y, alternative=alternative)
        assert got is not None
        assert got[0] == pytest.approx(float(ref.statistic), abs=1e-12)
        assert got[1] == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_theil_sen_matches_scipy_theilslopes(seed: int) -> None:
    """scipy.stats.theilslopes is the oracle for the slope: ties in x, outliers, 2-60 points."""
    rng = np.random.default_rng(seed)
    for n in (2, 3, 20, 39, 60):
        x = np.sort(rng.uniform(0, 100, n)) if seed % 2 else np.arange(n, dtype=np.float64)
        if seed == 4:
            x = np.round(x / 10)  # ties in x: those pairs have no slope
        y = -0.03 * x + rng.standard_normal(n) * (0.1 if seed < 2 else 3.0)
        y[rng.integers(0, n)] += 50.0  # an outlier the median ignores
        if np.unique(x).size < 2:
            assert theil_sen(x, y) is None
            continue
        got = theil_sen(x, y)
        assert got == pytest.approx(float(stats.theilslopes(y, x).slope), rel=1e-12)


def test_kendall_degenerate_windows_give_no_verdict() -> None:
    x = np.arange(50, dtype=np.float64)
    assert kendall(x, np.full(50, 2.0)) is None
    assert kendall(x[:2], np.array([1.0, 2.0])) is None
    assert kendall(x, np.r_[np.ones(49), math.nan]) is None
    with pytest.raises(ValueError, match="alternative"):
        kendall(x, np.arange(50.0), alternative="up")


# ------------------------------------------------------------------------------------ ratio
def test_ratio_high_start_up_transient_is_not_sustained() -> None:
    """The first logged points of a healthy run sit at 1-3e-2 and fall to 1e-3: no finding
    until a whole window exists, and the whole window's median is healthy."""
    v = np.r_[np.geomspace(3e-2, 1e-3, 15), np.full(45, 1e-3)]
    det = RatioDetector()
    assert all(det.check(*_series(v[:i]), tag="r") is None for i in range(1, v.size + 1))


def test_ratio_high_with_a_clearly_falling_loss_is_info_and_with_a_flat_one_a_warning() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(0, 300, 5)
    ratio = 4.5e-2 * (1 + 0.1 * rng.random(steps.size))
    loss_steps = np.arange(300)
    falling = 2.0 * np.exp(-loss_steps / 150) + 0.05 * rng.standard_normal(300)
    flat = 1.0 + 0.05 * rng.standard_normal(300)
    f = RatioDetector().check(steps, ratio, tag="r", loss=(loss_steps, falling))
    assert f is not None and (f.kind, f.severity) == (Kind.RATIO_HIGH, Severity.INFO)
    assert f.evidence["loss_falling"] and f.evidence["loss_p_value"] < 0.01
    f = RatioDetector().check(steps, ratio, tag="r", loss=(loss_steps, flat))
    assert f is not None and (f.kind, f.severity) == (Kind.RATIO_HIGH, Severity.WARNING)
    crit = RatioDetector().check(steps, ratio * 10, tag="r", loss=(loss_steps, falling))
    assert crit is not None and crit.severity is Severity.CRITICAL  # too large whatever the loss


# -------------------------------------------------------------------------------- explosion
def _noisy_then_climbing(climb: list[float], n: int = 120, sigma: float = 0.45) -> np.ndarray:
    """A regression-like loss: log-normal noise of log-sigma ``sigma`` around 0.7."""
    rng = np.random.default_rng(4)
    return np.asarray(np.r_[0.7 * np.exp(sigma * rng.standard_normal(n)), climb], np.float64)


def test_explosion_trend_rule_sees_a_noisy_loss_climb_the_spike_rule_misses() -> None:
    climb = [0.75, 0.9, 0.8, 1.3, 1.4, 1.5, 2.8, 4.8, 5.8, 6.8]
    v = _noisy_then_climbing(climb)
    spike_only = ExplosionDetector(trend_ratio=1e9)
    first_trend = first_spike = None
    for i in range(100, v.size + 1):
        f = ExplosionDetector().check(*_series(v[:i][-103:]), tag="l")
        if f is not None and first_trend is None:
            first_trend = i
            assert f.evidence["rule"] == "trend" and f.evidence["trend_p_value"] < 0.01
        if spike_only.check(*_series(v[:i][-103:]), tag="l") is not None and first_spike is None:
            first_spike = i
    assert first_trend is not None and first_trend <= v.size - 2
    assert first_spike is None or first_trend < first_spike


def test_explosion_trend_rule_ignores_a_bump_without_a_climb_and_the_start_of_a_run() -> None:
    det = ExplosionDetector()
    bump = _noisy_then_climbing([0.5, 2.6, 0.4, 2.9, 0.6, 3.1, 2.5, 2.2])  # not a climb
    assert det.check(*_series(bump[-103:]), tag="l") is None
    early = _noisy_then_climbing([0.75, 0.9, 0.8, 1.3, 1.4, 1.5, 2.8, 4.8], n=30)
    assert det.check(*_series(early), tag="l") is None  # 30 points: no established baseline


# ------------------------------------------------------------------------------ oscillation
def test_oscillation_with_high_ratio_needs_a_fall_larger_than_the_band_to_be_still_falling() -> (
    None
):
    """A loss bouncing in a band while drifting down by a fraction of it over 400 points is
    oscillating when the update ratio is high; the same drift with a healthy ratio is not."""
    rng = np.random.default_rng(7)
    n = 400
    drift = np.linspace(0.06, 0.0, n)  # 0.06 over 400 points; the band is ~0.25
    loss = 0.5 + drift + 0.1 * rng.standard_normal(n)
    steps = np.arange(n)
    assert kendall(steps.astype(np.float64), loss, alternative="less")[1] < 0.05  # type: ignore[index]
    high = (steps, np.full(n, 2e-2))
    f = OscillationDetector().check(steps, loss, tag="l", ratio=high)
    assert f is not None and f.evidence["long_fall_bands"] < 1.0
    assert f.evidence["strength"] == "strong"
    mid = (steps, np.full(n, 6e-3))
    assert OscillationDetector().check(steps, loss, tag="l", ratio=mid) is None
    falling = 0.5 + np.linspace(1.0, 0.0, n) + 0.1 * rng.standard_normal(n)
    assert OscillationDetector().check(steps, falling, tag="l", ratio=high) is None


def test_oscillation_needs_jitter_even_when_flat_with_a_high_ratio() -> None:
    """A slow, smooth wave is flat and corroborated by the ratio, but its differences rarely
    flip sign and are positively correlated: no oscillation."""
    steps = np.arange(400)
    wave = 1.0 + 0.1 * np.sin(2 * np.pi * steps / 12.5)
    high = (steps, np.full(400, 2e-2))
    assert OscillationDetector().check(steps, wave, tag="l", ratio=high) is None
    rng = np.random.default_rng(3)
    jitter = 1.0 + 0.1 * rng.standard_normal(400)  # same band, white noise
    assert OscillationDetector().check(steps, jitter, tag="l", ratio=high) is not None


# --------------------------------------------------------------------------------- analyzer
def _stuck_run(n: int, *, applied_at: int | None = None) -> list[Scalar]:
    """A loss bouncing in a band at a ratio of 3e-2, logged at LR 0.1 throughout (a replay), or
    with the LR divided by 10 from ``applied_at`` on (a run whose hook applied the cut)."""
    rng = np.random.default_rng(1)
    out = []
    for step in range(1, n + 1):
        applied = applied_at is not None and step >= applied_at
        lr = 0.01 if applied else 0.1
        out.append(Scalar(schema.LOSS, step, 0.0, 0.5 + 0.1 * rng.standard_normal()))
        out.append(Scalar(schema.LR, step, 0.0, lr))
        if step % 5 == 0:
            out.append(Scalar(schema.UPDATE_RATIO, step, 0.0, 3e-2 * (1 + 0.1 * rng.random())))
    return out


def test_replay_cuts_once_for_a_condition_its_unapplied_cut_cannot_change() -> None:
    analyzer = RunAnalyzer()
    analyzer.feed(_stuck_run(1500))
    cuts = [d for d in analyzer.decisions if d.action is ActionKind.LR_CUT]
    assert len(cuts) == 1, [(d.step, d.reason) for d in analyzer.decisions]
    assert not any(d.action is ActionKind.STOP for d in analyzer.decisions)
    assert analyzer.policy.total_cut == cuts[0].factor


def test_an_applied_cut_is_judged_on_fresh_points_only() -> None:
    """With a short cooldown, the next cut still waits for a whole window of points logged
    after the cut: evidence about the old LR says nothing about the new one."""
    config = load_config(overrides={"policy": {"cooldown_steps": 20}})
    first = RunAnalyzer(config)
    first.feed(_stuck_run(1500))
    cut_step = next(d.step for d in first.decisions if d.action is ActionKind.LR_CUT)
    analyzer = RunAnalyzer(config)
    analyzer.feed(_stuck_run(1500, applied_at=cut_step + 10))
    cuts = [d.step for d in analyzer.decisions if d.action is ActionKind.LR_CUT]
    assert cuts[0] == cut_step and len(cuts) >= 2  # still bouncing after the applied cut
    window = analyzer.config.oscillation.jitter_window
    assert cuts[1] - cuts[0] >= window


def test_the_hooks_acknowledgement_counts_as_applied_even_if_the_lr_looks_unchanged() -> None:
    """A schedule can hide a cut in the logged LR; ``lrwatch/lr_factor`` logged by the hook
    after the cut says it was applied, so fresh evidence may lead to another cut."""
    config = load_config(overrides={"policy": {"cooldown_steps": 20}})
    replay = RunAnalyzer(config)
    replay.feed(_stuck_run(1500))
    cut = next(d for d in replay.decisions if d.action is ActionKind.LR_CUT)
    assert cut.factor is not None
    acked = _stuck_run(1500) + [Scalar(schema.LR_FACTOR, cut.step + 10, 0.0, float(cut.factor))]
    analyzer = RunAnalyzer(config)
    analyzer.feed(acked)
    cuts = [d.step for d in analyzer.decisions if d.action is ActionKind.LR_CUT]
    assert cuts[0] == cut.step and len(cuts) >= 2


def test_a_nan_loss_under_amp_is_reported_once() -> None:
    analyzer = RunAnalyzer()
    pts = []
    for step in range(1, 41):
        loss = 1.0 if step < 40 else math.nan
        pts += [Scalar(schema.LOSS, step, 0.0, loss), Scalar(schema.LOSS_SCALE, step, 0.0, 1024.0)]
    analyzer.feed(pts)
    at_nan = [f for f in analyzer.findings if f.step == 40]
    assert [f.kind for f in at_nan] == [Kind.NONFINITE], [f.message for f in at_nan]


def test_clip_first_clips_a_first_spike_and_cuts_when_it_comes_back() -> None:
    norms = np.abs(np.random.default_rng(0).standard_normal(100)) + 0.5
    spike = Finding(Kind.EXPLOSION, 10, "g", Severity.CRITICAL, {"rule": "spike"}, "")
    p = Policy(clip_first=True, cooldown_steps=50)
    first = p.decide(10, [spike], grad_norms=norms)
    assert [d.action for d in first] == [ActionKind.CLIP]
    assert first[0].max_norm == pytest.approx(float(np.percentile(norms, 90)))
    assert p.total_cut == 1.0
    assert p.decide(30, [spike], grad_norms=norms) == []  # cooling down
    again = p.decide(80, [spike], grad_norms=norms)
    assert [(d.action, d.factor) for d in again] == [(ActionKind.LR_CUT, 10)]
    climb = Finding(Kind.EXPLOSION, 5, "l", Severity.WARNING, {"rule": "trend"}, "")
    fresh = Policy(clip_first=True)
    assert [d.action for d in fresh.decide(5, [climb], grad_norms=norms)] == [
        ActionKind.LR_CUT,
        ActionKind.CLIP,
    ]


def _series(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    return np.arange(v.size, dtype=np.int64), v
