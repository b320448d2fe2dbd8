"""Detectors on constructed series: tables of series in, kind/severity (or None) out."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrwatch import schema
from lrwatch.analysis.detectors.amp import AmpDetector
from lrwatch.analysis.detectors.divergence import DivergenceDetector
from lrwatch.analysis.detectors.explosion import ExplosionDetector
from lrwatch.analysis.detectors.nonfinite import NonfiniteDetector
from lrwatch.analysis.detectors.oscillation import OscillationDetector
from lrwatch.analysis.detectors.overfit import OverfitDetector
from lrwatch.analysis.detectors.ratio import RatioDetector, aggregate, weight_matrix_tags
from lrwatch.analysis.detectors.schedule import ScheduleDetector
from lrwatch.analysis.detectors.slow_progress import SlowProgressDetector
from lrwatch.errors import ConfigError

W = schema.Severity.WARNING
C = schema.Severity.CRITICAL
I = schema.Severity.INFO  # noqa: E741
Series = tuple[np.ndarray, np.ndarray]


def series(values: Any, *, start: int = 0) -> Series:
    v = np.asarray(values, dtype=np.float64)
    return np.arange(start, start + v.size, dtype=np.int64), v


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def healthy_loss(n: int = 1000, seed: int = 0) -> np.ndarray:
    """A still-falling training loss with 5% multiplicative minibatch noise."""
    t = np.arange(n)
    return (2.0 * np.exp(-t / 300) + 0.3) * np.exp(0.05 * rng(seed).standard_normal(n))


def healthy_grad_norm(n: int = 1000, seed: int = 1) -> np.ndarray:
    """Grad norms drifting down with heavy lognormal noise (sigma 0.3 in log space)."""
    t = np.arange(n)
    return (3.0 * np.exp(-t / 500) + 0.5) * np.exp(0.3 * rng(seed).standard_normal(n))


def flat_noise(n: int = 100, seed: int = 2, level: float = 1.0) -> np.ndarray:
    return level + 0.05 * rng(seed).standard_normal(n)


def no_warning_anywhere(check: Callable[[np.ndarray, np.ndarray], Any], v: np.ndarray) -> None:
    """Run ``check`` at every step of ``v`` (as the analyzer does) and fail on a warning."""
    s = np.arange(v.size, dtype=np.int64)
    for i in range(1, v.size + 1):
        f = check(s[:i], v[:i])
        assert f is None or f.severity == I, f"step {i - 1}: {f.message}"


# --------------------------------------------------------------------------------- nonfinite
NONFINITE_CASES = [
    ("nan_last", schema.LOSS, [2.0, 1.9, math.nan], None, C, 1),
    ("inf_last", schema.GRAD_NORM, [2.0, math.inf], None, C, 1),
    ("nan_at_step0", schema.LOSS, [math.nan], None, C, 1),
    ("nan_three_in_a_row", schema.LOSS, [1.0, math.nan, -math.inf, math.nan], None, C, 3),
    ("finite_last_after_nan", schema.LOSS, [math.nan, 1.0], None, None, 0),
    ("finite_huge", schema.LOSS, [1e30, 1e308], None, None, 0),
    ("negative_finite", schema.LOSS, [-5.0, -7.0], None, None, 0),
    ("empty", schema.LOSS, [], None, None, 0),
    ("flag_set", schema.NONFINITE, [0.0, 0.0, 1.0], None, C, 1),
    ("flag_clear", schema.NONFINITE, [1.0, 0.0], None, None, 0),
    ("flag_on_skipped_step_is_amp", schema.NONFINITE, [0.0, 1.0], [0.0, 1.0], None, 0),
    ("gradnorm_inf_on_skipped_step", schema.GRAD_NORM, [1.0, math.inf], [0.0, 1.0], None, 0),
    ("loss_nan_on_skipped_step_still_counts", schema.LOSS, [1.0, math.nan], [0.0, 1.0], C, 1),
]


@pytest.mark.parametrize(
    ("tag", "values", "skipped", "severity", "run"),
    [c[1:] for c in NONFINITE_CASES],
    ids=[c[0] for c in NONFINITE_CASES],
)
def test_nonfinite_flags_the_step_it_occurs(
    tag: str, values: list[float], skipped: list[float] | None, severity: Any, run: int
) -> None:
    s, v = series(values, start=10)
    f = NonfiniteDetector().check(
        s, v, tag=tag, skipped=None if skipped is None else series(skipped, start=10)
    )
    if severity is None:
        assert f is None
        return
    assert f is not None and f.kind == schema.Kind.NONFINITE and f.severity == severity
    assert f.step == s[-1] and f.evidence["consecutive"] == run
    assert f.evidence["first_step"] == s[-run]


# --------------------------------------------------------------------------------- explosion
def _spike_at_end(tail: list[float], n: int = 60, level: float = 1.0, seed: int = 3) -> np.ndarray:
    base = level * np.exp(0.05 * rng(seed).standard_normal(n))
    return np.r_[base, tail]


EXPLOSION_CASES = [
    ("constant", np.full(50, 2.0), None),
    ("constant_zero", np.zeros(50), None),
    ("very_short", np.array([1.0, 50.0, 5000.0]), None),
    ("short_history_single_jump", np.r_[np.ones(6), 100.0], None),
    ("nan_at_step0_then_flat", np.r_[math.nan, np.ones(40)], None),
    ("nan_last_is_nonfinite_detectors", np.r_[np.ones(40), math.nan], None),
    ("huge_constant", np.full(40, 1e30), None),
    ("huge_jump", np.r_[np.ones(40), 1e30], W),
    ("single_spike", _spike_at_end([10.0]), W),
    ("single_spike_fell_back", _spike_at_end([10.0, 1.0]), None),
    ("two_spikes", _spike_at_end([10.0, 30.0]), W),
    ("sustained_large", _spike_at_end([10.0, 30.0, 100.0]), C),
    ("sustained_but_small", _spike_at_end([2.5, 2.6, 2.7], seed=4), C),  # z >= 20 at 5% noise
    ("modest_bump_below_2x", _spike_at_end([1.6, 1.7, 1.8]), None),
    ("runaway_from_first_steps", np.array([5.6, 4.1, 268.0, 2.9e4, 4.4e6, 4.6e8]), C),
    ("negative_values_flat", -5.0 + 0.05 * rng(5).standard_normal(60), None),
    ("negative_values_jump_up", np.r_[-5.0 + 0.05 * rng(5).standard_normal(60), 20.0], W),
    ("drop_is_not_explosion", _spike_at_end([0.01, 0.001, 0.0001]), None),
]


@pytest.mark.parametrize(
    ("values", "severity"), [c[1:] for c in EXPLOSION_CASES], ids=[c[0] for c in EXPLOSION_CASES]
)
def test_explosion_table(values: np.ndarray, severity: Any) -> None:
    s, v = series(values)
    f = ExplosionDetector().check(s, v, tag=schema.GRAD_NORM)
    if severity is None:
        assert f is None, f.message
        return
    assert f is not None and f.kind == schema.Kind.EXPLOSION and f.severity == severity
    for key in ("value", "median", "mad", "robust_z", "ratio", "growth_rate", "consecutive"):
        assert key in f.evidence
    assert f.evidence["value"] == v[-1]
    json.dumps(f.to_json(), allow_nan=False)


def test_explosion_evidence_matches_an_independent_median_and_mad() -> None:
    base = _spike_at_end([])
    v = np.r_[base, 5.0, 6.0, 50.0]
    f = ExplosionDetector().check(*series(v), tag="x")
    assert f is not None
    logs = np.log(base[-100:])  # the baseline: everything before the last `confirm` points
    med = float(np.median(logs))
    sigma = 1.4826 * float(np.median(np.abs(logs - med)))
    assert f.evidence["median"] == pytest.approx(math.exp(med))
    assert f.evidence["robust_z"] == pytest.approx((math.log(50.0) - med) / sigma)
    assert f.evidence["ratio"] == pytest.approx(50.0 / math.exp(med))
    assert f.evidence["consecutive"] == 3


@pytest.mark.parametrize(
    "make", [healthy_loss, healthy_grad_norm], ids=["healthy_loss", "healthy_grad_norm"]
)
def test_explosion_stays_quiet_on_healthy_noisy_curves(make: Callable[[], np.ndarray]) -> None:
    det = ExplosionDetector()
    no_warning_anywhere(lambda s, v: det.check(s[-103:], v[-103:], tag="x"), make())


# ------------------------------------------------------------------------------- oscillation
def _alternating(n: int = 100, amp: float = 0.05, seed: int = 6) -> np.ndarray:
    return 1.0 + amp * (-1.0) ** np.arange(n) + 0.01 * rng(seed).standard_normal(n)


def _ratio(level: float, n: int = 100) -> Series:
    return series(np.full(n, level))


OSC_CASES: list[tuple[str, np.ndarray, Series | None, str | None]] = [
    ("alternating_no_ratio", _alternating(), None, "mild"),
    ("alternating_high_ratio", _alternating(), _ratio(2e-2), "strong"),
    ("alternating_mid_ratio", _alternating(), _ratio(6e-3), "strong"),
    ("flat_noise_high_ratio", flat_noise(), _ratio(2e-2), "strong"),
    ("flat_noise_mid_ratio", flat_noise(), _ratio(6e-3), "mild"),
    ("flat_noise_healthy_ratio", flat_noise(), _ratio(1e-3), None),
    ("flat_noise_no_ratio", flat_noise(), None, None),
    ("falling_noisy_high_ratio", healthy_loss(100), _ratio(2e-2), None),
    (
        "random_walk_high_ratio",
        5 + np.cumsum(0.05 * rng(7).standard_normal(100)),
        _ratio(2e-2),
        None,
    ),
    ("constant_high_ratio", np.full(100, 1.0), _ratio(2e-2), None),
    ("too_short", _alternating(20), _ratio(2e-2), None),
    ("nan_last", np.r_[_alternating(99), math.nan], _ratio(2e-2), None),
    ("negative_alternating", -3.0 + _alternating(), None, "mild"),
    ("huge_alternating", 1e30 * _alternating(), None, "mild"),
    ("ratio_outside_window_ignored", flat_noise(), series(np.full(50, 2e-2), start=-100), None),
]


@pytest.mark.parametrize(
    ("values", "ratio", "strength"), [c[1:] for c in OSC_CASES], ids=[c[0] for c in OSC_CASES]
)
def test_oscillation_table(values: np.ndarray, ratio: Series | None, strength: str | None) -> None:
    f = OscillationDetector().check(*series(values), tag=schema.LOSS, ratio=ratio)
    if strength is None:
        assert f is None, f.message
        return
    assert f is not None and f.kind == schema.Kind.OSCILLATION and f.severity == W
    assert f.evidence["strength"] == strength and f.evidence["mild"] == (strength == "mild")
    json.dumps(f.to_json(), allow_nan=False)


def test_oscillation_plain_white_noise_plateaus_are_rarely_called_oscillating() -> None:
    """Without ratio corroboration, 200 noisy plateaus must give (almost) no finding."""
    det = OscillationDetector()
    hits = sum(det.check(*series(flat_noise(seed=k)), tag="x") is not None for k in range(200))
    assert hits <= 6  # the turning-point test is one-sided at 1%


def test_oscillation_stays_quiet_on_a_healthy_falling_run() -> None:
    det = OscillationDetector()
    ratio = _ratio(2e-2, 1000)
    no_warning_anywhere(
        lambda s, v: det.check(s[-100:], v[-100:], tag="x", ratio=ratio), healthy_loss()
    )


# ------------------------------------------------------------------------------------- ratio
RATIO_CASES = [
    ("healthy", np.full(60, 1e-3), None, None),
    ("high", np.full(60, 5e-2), schema.Kind.RATIO_HIGH, W),
    ("very_high", np.full(60, 0.2), schema.Kind.RATIO_HIGH, C),
    ("low", np.full(60, 1e-5), schema.Kind.RATIO_LOW, I),
    ("single_high_step_is_not_sustained", np.r_[np.full(59, 1e-3), 1.0], None, None),
    ("mostly_high", np.r_[np.full(20, 1e-3), np.full(40, 5e-2)], schema.Kind.RATIO_HIGH, W),
    ("too_short", np.full(5, 1.0), None, None),
    ("nan_last", np.r_[np.full(59, 1.0), math.nan], None, None),
    (
        "nans_inside_ignored",
        np.r_[np.full(30, 5e-2), np.full(10, math.nan), np.full(20, 5e-2)],
        schema.Kind.RATIO_HIGH,
        W,
    ),
    ("zeros_frozen", np.zeros(60), schema.Kind.RATIO_LOW, I),
]


@pytest.mark.parametrize(
    ("values", "kind", "severity"), [c[1:] for c in RATIO_CASES], ids=[c[0] for c in RATIO_CASES]
)
def test_ratio_table(values: np.ndarray, kind: Any, severity: Any) -> None:
    f = RatioDetector().check(*series(values), tag=schema.UPDATE_RATIO)
    if kind is None:
        assert f is None, f.message
        return
    assert f is not None and (f.kind, f.severity) == (kind, severity)
    finite = values[np.isfinite(values)][-50:]
    assert f.evidence["median"] == pytest.approx(float(np.median(finite)))


def test_ratio_weight_matrix_tags_keep_matrices_only() -> None:
    names = {
        "transformer.h.0.attn.c_attn.weight": True,
        "transformer.h.0.attn.c_attn.bias": False,
        "transformer.h.0.ln_1.weight": False,
        "transformer.wte.weight": False,
        "model.embed_tokens.weight": False,
        "model.layers.0.input_layernorm.weight": False,
        "bn1.weight": False,
        "conv1.weight": True,
        "fc.weight": True,
        "0.weight": True,
    }
    tags = [schema.per_tensor_tag("update_ratio", n) for n in names]
    tags += [schema.UPDATE_RATIO, schema.per_tensor_tag("grad_norm", "fc.weight")]
    expect = sorted(schema.per_tensor_tag("update_ratio", n) for n, keep in names.items() if keep)
    assert weight_matrix_tags(tags) == expect


def test_ratio_aggregate_is_the_per_step_median_over_tensors() -> None:
    r = rng(8)
    parts = {}
    for k in range(4):
        steps = np.sort(r.choice(50, size=30, replace=False)).astype(np.int64)
        parts[f"t{k}"] = (steps, r.lognormal(-7, 1, size=30))
    s, v = aggregate(parts)
    for step, value in zip(s.tolist(), v.tolist(), strict=True):
        present = [float(pv[ps == step][0]) for ps, pv in parts.values() if step in ps]
        assert value == pytest.approx(float(np.median(present)))
    assert s.tolist() == sorted({int(x) for ps, _ in parts.values() for x in ps})
    assert aggregate({})[0].size == 0


# ------------------------------------------------------------------------------------ overfit
def _train(n: int = 1000, falling: bool = True) -> Series:
    t = np.arange(n)
    base = 2.0 * np.exp(-t / 300) + 0.1 if falling else np.full(n, 0.5)
    return series(base * np.exp(0.03 * rng(9).standard_normal(n)))


_VAL_STEPS = np.arange(0, 1000, 100, dtype=np.int64)
OVERFIT_CASES = [
    ("classic", [2.0, 1.5, 1.2, 1.1, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5], "min", True, True),
    (
        "still_improving",
        [2.0, 1.5, 1.2, 1.1, 1.05, 1.0, 0.98, 0.97, 0.96, 0.95],
        "min",
        True,
        False,
    ),
    (
        "two_bad_evals_only",
        [2.0, 1.5, 1.2, 1.1, 1.05, 1.0, 0.98, 0.97, 1.2, 1.3],
        "min",
        True,
        False,
    ),
    (
        "within_margin",
        [2.0, 1.5, 1.2, 1.1, 1.0, 1.005, 1.006, 1.007, 1.008, 1.009],
        "min",
        True,
        False,
    ),
    ("train_flat_too", [2.0, 1.5, 1.2, 1.1, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5], "min", False, False),
    ("accuracy_falling", [0.5, 0.7, 0.8, 0.85, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65], "max", True, True),
    (
        "negative_metric",
        [-1.0, -1.5, -1.8, -2.0, -2.1, -2.0, -1.9, -1.8, -1.7, -1.6],
        "min",
        True,
        True,
    ),
    ("constant_val", [1.0] * 10, "min", True, False),
    ("nan_last", [2.0, 1.5, 1.2, 1.1, 1.05, 1.1, 1.2, 1.3, 1.4, math.nan], "min", True, False),
]


@pytest.mark.parametrize(
    ("val", "mode", "train_falls", "flag"),
    [c[1:] for c in OVERFIT_CASES],
    ids=[c[0] for c in OVERFIT_CASES],
)
def test_overfit_table(val: list[float], mode: Any, train_falls: bool, flag: bool) -> None:
    det = OverfitDetector(mode=mode)
    f = det.check(_VAL_STEPS, np.array(val), tag="val/loss", train=_train(falling=train_falls))
    assert (f is not None) == flag, f and f.message
    if f is not None:
        signed = np.array(val) * (1 if mode == "min" else -1)
        assert f.evidence["best_step"] == _VAL_STEPS[int(np.argmin(signed))]
        assert f.kind == schema.Kind.OVERFIT and f.evidence["train_tau"] < 0


def test_overfit_is_not_a_run_that_never_beat_its_untrained_validation() -> None:
    # Evaluated before the first step (at chance), then only worse while the training loss falls
    # back from a blow-up: a run that never learned, which stopping would not fix.
    val = np.array([2.30, 2.36, 2.40, 2.45, 2.50, 2.55, 2.60, 2.62, 2.64, 2.66])
    train = series(np.linspace(40.0, 2.4, 999), start=1)
    assert OverfitDetector().check(_VAL_STEPS, val, tag="v", train=train) is None


def test_overfit_from_the_first_evaluation_on_is_still_overfitting() -> None:
    # A big model on a tiny train set: validation is best at its first evaluation, the training
    # loss then falls by orders of magnitude (bench scenario overfit_diabetes_80).
    val = np.array([0.55, 0.61, 0.70, 0.73, 0.76, 0.78, 0.81, 0.84, 0.86, 0.88])
    steps = np.arange(10, 110, 10, dtype=np.int64)
    train = series(0.5 * np.exp(-np.arange(1, 101) / 15.0), start=1)
    f = OverfitDetector().check(steps, val, tag="v", train=train)
    assert f is not None and f.evidence["best_step"] == 10


def test_overfit_needs_training_below_its_level_when_validation_was_best() -> None:
    # Training blew up after the best evaluation and is only falling back towards where it was:
    # a falling trend, but not past the level it had when validation was best.
    val = np.array([2.0, 1.5, 1.2, 1.3, 1.5, 1.7, 1.9, 2.0, 2.1, 2.2])
    t = np.arange(1000)
    level = np.where(t <= 200, 1.0, 1.0 + 40.0 * np.exp(-(t - 200) / 150.0))
    train = series(level * np.exp(0.03 * rng(3).standard_normal(1000)))
    assert OverfitDetector().check(_VAL_STEPS, val, tag="v", train=train) is None
    healthy = series(np.where(t <= 200, 1.0, 1.0 - 0.5 * (t - 200) / 800))
    f = OverfitDetector().check(_VAL_STEPS, val, tag="v", train=healthy)
    assert f is not None and f.evidence["train_now"] < f.evidence["train_at_best"]


def test_overfit_is_not_a_lucky_low_evaluation_followed_by_a_flat_stretch() -> None:
    # One evaluation dipped while the LR was too high; after a cut validation sits flat a little
    # above it while training improves: worse than the best, but not turning up.
    val = np.array([1.2, 0.437, 0.48, 0.47, 0.475, 0.47, 0.476, 0.472, 0.474, 0.473])
    assert OverfitDetector().check(_VAL_STEPS, val, tag="v", train=_train()) is None


def test_overfit_needs_training_points_since_the_best() -> None:
    val = np.array([2.0, 1.5, 1.2, 1.1, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5])
    short = series(np.linspace(1.0, 0.5, 5), start=995)
    assert OverfitDetector().check(_VAL_STEPS, val, tag="v", train=short) is None


# ----------------------------------------------------------------------------------- schedule
_T = np.arange(2000, dtype=np.int64)
SCHEDULE_CASES = [
    ("warmup_linear", 1e-3 * np.minimum(1.0, (_T[:50] + 1) / 100), "warmup"),
    ("warmup_from_zero", 1e-3 * _T[:50] / 100, "warmup"),
    ("constant", np.full(100, 3e-4), "constant"),
    ("cosine_decaying", 1e-3 * 0.5 * (1 + np.cos(np.pi * _T[:1200] / 2000)), "decaying"),
    ("step_cut_recent", np.where(_T[:310] < 300, 1e-2, 1e-3), "cut"),
    ("step_cut_long_ago", np.where(_T[:400] < 300, 1e-2, 1e-3), "constant"),
    ("warmup_then_cut_recent", np.r_[np.linspace(1e-4, 1e-3, 10), np.full(5, 1e-4)], "cut"),
    ("single_point", np.array([1e-3]), "unknown"),
    ("empty", np.zeros(0), "unknown"),
    ("nan_last", np.r_[np.full(10, 1e-3), math.nan], "unknown"),
    (
        "printed_rounding_is_constant",
        np.r_[np.full(10, 5.279e-5), np.full(10, 5.278e-5)],
        "constant",
    ),
]


@pytest.mark.parametrize(
    ("lr", "phase"), [c[1:] for c in SCHEDULE_CASES], ids=[c[0] for c in SCHEDULE_CASES]
)
def test_schedule_phase_table(lr: np.ndarray, phase: str) -> None:
    got = ScheduleDetector().check(*series(lr))
    assert got.phase == phase, got.evidence
    json.dumps(got.evidence)


def test_schedule_phase_follows_torch_schedulers() -> None:
    """Phases read off the LR that torch's own schedulers produce."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=100)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=200, gamma=0.1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, step], milestones=[100])
    lrs = []
    for _ in range(400):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr = np.array(lrs)
    det = ScheduleDetector()
    phases = [det.check(*series(lr[: i + 1])).phase for i in range(lr.size)]
    assert set(phases[5:100]) == {"warmup"}
    assert phases[150] == "constant"
    assert phases[301] == "cut" and phases[399] == "constant"


# ---------------------------------------------------------------------------------------- amp
def _scale_run(halvings_at: dict[int, int], n: int = 400, start: float = 65536.0) -> Series:
    """A loss-scale series that halves ``k`` times at the given steps and otherwise holds."""
    v, cur = [], start
    for t in range(n):
        cur /= 2.0 ** halvings_at.get(t, 0)
        v.append(cur)
    return series(v)


def _flags(steps: list[int], n: int = 400, dense: bool = True) -> Series:
    if dense:
        v = np.zeros(n)
        v[steps] = 1.0
        return series(v)
    return np.array(steps, dtype=np.int64), np.ones(len(steps))


_SKIP_30 = list(range(300, 400, 3))  # 34 skips in the last 100 steps
_SKIP_60 = [t for t in range(300, 400) if t % 5 < 3]
AMP_CASES: list[tuple[str, dict[str, Any], Any, Any, str | None]] = [
    (
        "isolated_backoff",
        {"scale": _scale_run({350: 1}), "skipped": _flags([350])},
        None,
        None,
        None,
    ),
    (
        "startup_search",
        {
            "scale": _scale_run({1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}),
            "skipped": _flags([1, 2, 3, 4, 5, 6]),
        },
        None,
        None,
        None,
    ),
    (
        "repeated_backoff",
        {"scale": _scale_run({390: 1, 392: 1, 394: 1, 396: 1})},
        schema.Kind.EXPLOSION,
        W,
        "repeated_backoff",
    ),
    (
        "backoffs_with_growth_between",
        {"scale": _scale_run({390: 1, 392: 1, 393: -1, 394: 1, 396: 1})},
        None,
        None,
        None,
    ),
    (
        "sparse_logging_one_drop_of_16x",
        {"scale": _scale_run({399: 4})},
        schema.Kind.EXPLOSION,
        W,
        "repeated_backoff",
    ),
    (
        "scale_collapse",
        {"scale": _scale_run({399: 17})},
        schema.Kind.EXPLOSION,
        C,
        "scale_collapse",
    ),
    ("persistent_skipping", {"skipped": _flags(_SKIP_30)}, schema.Kind.NONFINITE, W, "skipping"),
    (
        "persistent_skipping_sparse_flags",
        {"scale": _scale_run({}), "skipped": _flags(_SKIP_30, dense=False)},
        schema.Kind.NONFINITE,
        W,
        "skipping",
    ),
    ("majority_skipping", {"skipped": _flags(_SKIP_60)}, schema.Kind.NONFINITE, C, "skipping"),
    ("skipping_with_too_little_history", {"skipped": _flags([1, 2, 3], n=10)}, None, None, None),
    (
        "nonfinite_loss",
        {"scale": _scale_run({}), "loss": series(np.r_[np.ones(399), math.nan])},
        schema.Kind.NONFINITE,
        C,
        "nonfinite_loss",
    ),
    ("nothing_logged", {"scale": None}, None, None, None),
    ("bf16_scale_one", {"scale": series(np.ones(400))}, None, None, None),
]


@pytest.mark.parametrize(
    ("kwargs", "kind", "severity", "rule"),
    [c[1:] for c in AMP_CASES],
    ids=[c[0] for c in AMP_CASES],
)
def test_amp_table(kwargs: dict[str, Any], kind: Any, severity: Any, rule: str | None) -> None:
    f = AmpDetector().check(**({"scale": None} | kwargs))
    if kind is None:
        assert f is None, f.message
        return
    assert f is not None and (f.kind, f.severity) == (kind, severity)
    assert f.evidence["amp"] == rule
    json.dumps(f.to_json(), allow_nan=False)


# ------------------------------------------------------------------------------ construction
BAD_CONFIGS: list[tuple[str, Callable[[], object]]] = [
    ("nonfinite_threshold", lambda: NonfiniteDetector(flag_threshold=1.5)),
    ("explosion_history_over_window", lambda: ExplosionDetector(min_history=200)),
    ("explosion_z_order", lambda: ExplosionDetector(z_warning=30.0)),
    ("explosion_ratio_below_one", lambda: ExplosionDetector(min_ratio=0.5)),
    ("explosion_growth_points", lambda: ExplosionDetector(growth_points=2)),
    ("oscillation_min_points", lambda: OscillationDetector(min_points=5)),
    ("oscillation_ratio_order", lambda: OscillationDetector(ratio_mild=0.1)),
    ("ratio_low_above_high", lambda: RatioDetector(low=0.1)),
    ("slow_progress_points", lambda: SlowProgressDetector(min_points=5)),
    ("slow_progress_alpha", lambda: SlowProgressDetector(alpha=1.5)),
    ("overfit_mode", lambda: OverfitDetector(mode="auto")),  # type: ignore[arg-type]
    ("overfit_patience", lambda: OverfitDetector(patience=0)),
    ("amp_backoffs", lambda: AmpDetector(max_backoffs=1)),
    ("amp_fraction", lambda: AmpDetector(max_skip_fraction=1.5)),
    ("schedule_tolerances", lambda: ScheduleDetector(rel_tol=0.5)),
]


@pytest.mark.parametrize("build", [c[1] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_detectors_reject_bad_settings_at_construction(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        build()


# --------------------------------------------------------------------------- totality (property)
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 1e-30]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_floats, min_size=0, max_size=40))
def test_detectors_never_raise_and_evidence_is_strict_json(values: list[float]) -> None:
    s, v = series(values)
    r = (s, np.abs(v))
    findings = [
        NonfiniteDetector().check(s, v, tag=schema.LOSS),
        ExplosionDetector(min_history=3, window=20).check(s, v, tag=schema.GRAD_NORM),
        OscillationDetector(min_points=10, jitter_window=20, window=40).check(
            s, v, tag=schema.LOSS, ratio=r
        ),
        RatioDetector(min_points=3).check(s, v, tag=schema.UPDATE_RATIO),
        SlowProgressDetector(min_points=12).check(s, v, tag=schema.LOSS),
        OverfitDetector(patience=1, min_train_points=3).check(s, v, tag="val", train=(s, v)),
        AmpDetector(window=10).check(scale=(s, v), skipped=(s, v), loss=(s, v)),
    ]
    for f in findings:
        if f is not None:
            json.dumps(f.to_json(), allow_nan=False)
            assert f.step == s[-1]
    ScheduleDetector().check(s, v)


def test_explosion_noise_floor_should_silence_near_zero_loss_noise_but_not_a_divergence() -> None:
    """A converged classifier's loss (median ~1e-3, hard batches at 5x) is a huge log-space
    ratio but nothing on the loss's own scale (2.3 at the start); a loss back at 1.5 is."""
    rng = np.random.default_rng(0)
    loss = 1e-3 * np.exp(0.3 * rng.standard_normal(200))
    noisy = np.r_[loss, 5.2e-3, 5.5e-3, 6e-3]
    steps = np.arange(noisy.size)
    det = ExplosionDetector()
    assert det.check(steps, noisy, tag=schema.LOSS) is not None  # without the floor: an alarm
    assert det.check(steps, noisy, tag=schema.LOSS, scale=2.3) is None
    diverging = np.r_[loss, 0.5, 1.0, 1.5]
    f = det.check(steps, diverging, tag=schema.LOSS, scale=2.3)
    assert f is not None and f.severity is schema.Severity.CRITICAL


def test_explosion_noise_floor_should_need_a_point_above_every_recent_one() -> None:
    """A heavy-tailed loss whose hard batches reach 3x its median has them in its baseline."""
    rng = np.random.default_rng(1)
    loss = 0.1 * np.exp(0.2 * rng.standard_normal(100))
    loss[::15] = 0.33  # a hard batch every 15 steps
    series = np.r_[loss, 0.32]
    steps = np.arange(series.size)
    assert ExplosionDetector().check(steps, series, tag=schema.LOSS) is not None
    assert ExplosionDetector().check(steps, series, tag=schema.LOSS, scale=2.3) is None


def test_steps_to_next_cut_should_predict_torch_steplr() -> None:
    """The LR of torch's own StepLR, logged every step: the prediction after its second cut
    is where torch cuts next."""
    import torch

    from lrwatch.analysis.detectors.schedule import steps_to_next_cut

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.3)
    lrs = []
    for _ in range(440):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    steps = np.arange(len(lrs))
    next_torch_cut = 450  # from torch's own arithmetic: every step_size steps
    left, period = steps_to_next_cut(steps, np.array(lrs), ignore=np.array([], np.int64))
    assert (steps[-1] + left, period) == (next_torch_cut, 150)
    # a drop that lrwatch applied (its lr_factor step) is not the schedule's
    assert steps_to_next_cut(steps[:200], np.array(lrs[:200]), ignore=np.array([150])) is None


# ---------------------------------------------------------------- divergence
def test_divergence_should_flag_a_loss_stuck_far_above_its_start() -> None:
    start = 4.6
    v = np.r_[
        start * np.exp(0.05 * rng(3).standard_normal(30)),
        70 * np.exp(0.1 * rng(4).standard_normal(15)),
    ]
    f = DivergenceDetector().check(*series(v), tag="loss", scale=start)
    assert f is not None and f.kind is schema.Kind.DIVERGENCE and f.severity is C
    assert f.evidence["ratio"] == pytest.approx(np.median(v[-10:]) / start)
    assert json.loads(json.dumps(f.evidence, allow_nan=False)) == f.evidence


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (70.0 - 6.0 * np.arange(10), "falling: a recovery under way"),
        (np.full(10, 2.9 * 4.6), "below 3x the start"),
        (np.r_[np.full(8, 70.0), 4.0, 4.2], "the last point is back"),
    ],
)
def test_divergence_should_leave_a_recovering_or_moderate_loss_alone(
    tail: np.ndarray, why: str
) -> None:
    v = np.r_[np.full(30, 4.6), tail]
    assert DivergenceDetector().check(*series(v), tag="loss", scale=4.6) is None, why


def test_divergence_should_never_fire_on_a_healthy_or_noisy_loss() -> None:
    d = DivergenceDetector()
    for v in (healthy_loss(), flat_noise(300), 0.001 * np.exp(rng(5).standard_normal(300))):
        scale = float(np.median(v[:10]))
        no_warning_anywhere(lambda s, x, c=scale: d.check(s, x, tag="loss", scale=c), v)


def test_divergence_needs_a_positive_start_level() -> None:
    v = np.full(20, 50.0)
    for scale in (None, 0.0, -1.0, math.nan):
        assert DivergenceDetector().check(*series(v), tag="loss", scale=scale) is None


# ---------------------------------------------------------------- early ratio verdict
def test_ratio_should_be_critical_early_when_updates_are_huge_and_the_loss_does_not_fall() -> None:
    ratios = series(0.15 + 0.02 * rng(6).standard_normal(12), start=1)
    flat = series(2.3 + 0.3 * rng(7).standard_normal(12), start=1)
    f = RatioDetector().check(*ratios, tag="lrwatch/update_ratio", loss=flat)
    assert f is not None and f.severity is C and f.evidence["early"] is True
    assert f.evidence["window"] == 12


def test_ratio_early_verdict_should_wait_for_a_falling_loss_a_moderate_ratio_or_enough_points() -> (
    None
):
    r = RatioDetector()
    falling = series(2.3 - 0.1 * np.arange(12), start=1)
    flat = series(np.full(12, 2.3) + 0.01 * rng(8).standard_normal(12), start=1)
    assert r.check(*series(np.full(12, 0.15), start=1), tag="r", loss=falling) is None
    assert r.check(*series(np.full(12, 0.05), start=1), tag="r", loss=flat) is None
    assert r.check(*series(np.full(9, 0.15), start=1), tag="r", loss=flat) is None
    assert r.check(*series(np.full(12, 0.15), start=1), tag="r") is None  # no loss: no verdict


def test_oscillation_should_leave_a_loss_jittering_near_its_floor_alone() -> None:
    """The same jittering band, with a high update ratio: at 30% of the loss's start level it
    is an LR bouncing the run; at 4% of it, a converged classifier's minibatch noise."""
    det, loss = OscillationDetector(), flat_noise()  # jitters around 1.0
    assert det.check(*series(loss), tag="l", ratio=_ratio(2e-2), scale=3.0) is not None
    assert det.check(*series(loss), tag="l", ratio=_ratio(2e-2), scale=25.0) is None


# ------------------------------------------------------------------------------ slow progress
def _noisy(curve: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    return curve + np.random.default_rng(seed).normal(0, sd, curve.size)


def test_slow_progress_should_flag_a_loss_falling_straight_since_the_start() -> None:
    steps = np.arange(1, 201)
    f = SlowProgressDetector().check(steps, _noisy(2.3 - 0.004 * steps, 0.02), tag="loss")
    assert f is not None and f.kind is schema.Kind.SLOW_PROGRESS
    assert f.severity is schema.Severity.INFO
    # the slopes are the line's, whatever the noise: against least squares on the thirds
    first = np.polyfit(steps[:66], 2.3 - 0.004 * steps[:66], 1)[0]
    assert f.evidence["first_slope"] == pytest.approx(first, rel=0.15)
    assert f.evidence["slope_ratio"] == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("tau", [10.0, 30.0, 60.0])
def test_slow_progress_should_leave_a_curve_that_flattened_alone(tau: float) -> None:
    steps = np.arange(1, 301)
    loss = _noisy(0.1 + 2.2 * np.exp(-steps / tau), 0.02)
    assert SlowProgressDetector().check(steps, loss, tag="loss") is None


def test_slow_progress_should_need_the_start_of_the_run_and_the_end_of_its_warm_up() -> None:
    steps = np.arange(5001, 5301)  # a resumed run: its file starts at step 5001
    line = _noisy(2.3 - 0.004 * np.arange(300), 0.02)
    assert SlowProgressDetector().check(steps, line, tag="loss") is None
    steps = np.arange(1, 201)
    line = _noisy(2.3 - 0.004 * steps, 0.02)
    assert SlowProgressDetector().check(steps, line, tag="loss", peak_step=100) is None
    assert SlowProgressDetector().check(steps, line, tag="loss", peak_step=50) is not None


def test_slow_progress_should_ignore_noise_and_short_runs() -> None:
    steps = np.arange(1, 301)
    assert SlowProgressDetector().check(steps, _noisy(np.full(300, 1.0), 0.1), tag="l") is None
    short = np.arange(1, 80)
    assert SlowProgressDetector().check(short, 2.3 - 0.004 * short, tag="l") is None
