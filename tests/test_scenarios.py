"""Detection quality guard: real tiny trainings recorded by the hook, replayed by the analyzer.

The full labelled suite lives in ``bench/scenarios.py``; these two runs keep its headline claims
in CI: a run whose LR is ramped far too high is flagged (explosion) before its first NaN and the
NaN at its step, and a healthy run gets no warning at all.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from lrwatch import schema
from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.events.reader import read_run
from lrwatch.schema import Kind, Severity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scenario_runs import Recipe, train, warmup_to  # noqa: E402


def replay(run_dir: Path) -> tuple[RunAnalyzer, int | None]:
    scalars = read_run(run_dir)
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    bad = [
        s.step
        for s in scalars
        if (s.tag == schema.LOSS and not math.isfinite(s.value))
        or (s.tag == schema.NONFINITE and s.value > 0.5)
    ]
    return analyzer, min(bad) if bad else None


@pytest.mark.slow
def test_scenario_diverging_run_is_flagged_before_its_first_nan(tmp_path: Path) -> None:
    recipe = Recipe("diabetes", (64,), "sgd", 0.01, 500, schedule=warmup_to(150, 300), seed=1)
    train(recipe, tmp_path / "diverging", log_every=5)
    analyzer, first_nan = replay(tmp_path / "diverging")
    assert first_nan is not None, "the recipe must really diverge"
    explosion = [f.step for f in analyzer.findings if f.kind is Kind.EXPLOSION]
    nonfinite = [f.step for f in analyzer.findings if f.kind is Kind.NONFINITE]
    assert explosion and min(explosion) < first_nan
    assert nonfinite and min(nonfinite) == first_nan
    assert any(d.step <= first_nan for d in analyzer.decisions)


@pytest.mark.slow
def test_scenario_healthy_run_gets_no_warning(tmp_path: Path) -> None:
    recipe = Recipe("digits", (128,), "adam", 1e-3, 300)
    train(recipe, tmp_path / "healthy", log_every=5)
    analyzer, first_nan = replay(tmp_path / "healthy")
    assert first_nan is None
    loud = [(f.kind.value, f.step) for f in analyzer.findings if f.severity is not Severity.INFO]
    assert loud == []
    assert analyzer.decisions == []


@pytest.mark.slow
def test_scenario_lr_ten_times_too_low_gets_raise_advice_within_300_steps(tmp_path: Path) -> None:
    """Adam at 1e-4 on the healthy run's task: its update ratio (~1e-3) looks healthy by the
    1e-3 rule; its loss still falls in a straight line from the start, which the healthy run's
    (1e-3, above: no decision at all) does not."""
    recipe = Recipe("digits", (128,), "adam", 1e-4, 300)
    train(recipe, tmp_path / "slow", log_every=5)
    analyzer, _ = replay(tmp_path / "slow")
    advice = [d.step for d in analyzer.decisions if d.action is schema.ActionKind.RAISE_LR_ADVICE]
    assert advice and advice[0] <= 300
    assert all(f.severity is Severity.INFO for f in analyzer.findings)
