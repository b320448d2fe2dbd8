"""analyze.py: the replay engine (roles, de-duplication, batch invariance, state, analyze_run)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lrwatch import schema
from lrwatch.analysis.analyzer import NoUsableTags, RunAnalyzer, analyze_run
from lrwatch.analysis.config import load_config
from lrwatch.analysis.roles import assign
from lrwatch.errors import LrwatchError, RunGone
from lrwatch.schema import ActionKind, Kind, Scalar, Severity
from lrwatch.views.analysis_table import format_table


def run_series(n: int, *, seed: int = 0, blowup_at: int | None = None) -> list[Scalar]:
    """A noisy, slowly falling loss; from ``blowup_at`` on, grad norm and loss grow 1.6x a
    step until they overflow to inf and then NaN, as an SGD run with too high an LR does."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(1, n + 1):
        loss = 2.0 * math.exp(-step / 400) + 0.3 + 0.05 * rng.standard_normal()
        gn = 1.0 + 0.1 * rng.standard_normal()
        if blowup_at is not None and step >= blowup_at:
            k = step - blowup_at
            gn = gn * 1.6**k if k < 60 else math.inf if k < 62 else math.nan
            loss = loss * 1.3**k if k < 60 else math.nan
        out.append(Scalar(schema.LOSS, step, 0.0, loss))
        out.append(Scalar(schema.NONFINITE, step, 0.0, 0.0 if math.isfinite(loss) else 1.0))
        out.append(Scalar(schema.LR, step, 0.0, 0.01))
        if step % 5 == 0 or not math.isfinite(gn):
            out.append(Scalar(schema.GRAD_NORM, step, 0.0, gn))
            out.append(Scalar(schema.UPDATE_RATIO, step, 0.0, 1e-3 * (1 + 0.1 * rng.random())))
    return out


def first_nan(scalars: list[Scalar]) -> int:
    return min(s.step for s in scalars if not math.isfinite(s.value))


def test_analyzer_flags_explosion_before_the_first_nan_and_nan_at_its_step() -> None:
    scalars = run_series(600, blowup_at=400)
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    nan_step = first_nan(scalars)
    explosions = [f for f in analyzer.findings if f.kind is Kind.EXPLOSION]
    nonfinite = [f for f in analyzer.findings if f.kind is Kind.NONFINITE]
    assert explosions and explosions[0].step < nan_step
    assert min(f.step for f in nonfinite) == nan_step
    assert analyzer.decisions, "a diverging run must lead to a decision"


def test_analyzer_reports_an_ongoing_condition_once() -> None:
    scalars = run_series(600, blowup_at=400)
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    per_tag = [(f.tag, f.severity) for f in analyzer.findings if f.kind is Kind.NONFINITE]
    # 140 non-finite steps in a row, one finding per tag (and per escalation, none here)
    assert sorted(per_tag) == sorted(set(per_tag))


def test_analyzer_is_quiet_on_a_healthy_run() -> None:
    analyzer = RunAnalyzer()
    analyzer.feed(run_series(1500))
    loud = [f for f in analyzer.findings if f.severity is not Severity.INFO]
    assert loud == []


def test_analyzer_gives_the_same_answer_whatever_the_batching() -> None:
    scalars = run_series(700, blowup_at=500)
    whole = RunAnalyzer()
    whole.feed(scalars)
    chunked, rng, i = RunAnalyzer(), random.Random(1), 0
    while i < len(scalars):
        n = rng.randint(1, 40)
        chunked.feed(scalars[i : i + n])
        i += n
    assert chunked.findings == whole.findings
    assert chunked.decisions == whole.decisions


def test_analyzer_state_dict_round_trips_through_json() -> None:
    scalars = run_series(700, blowup_at=500)
    whole = RunAnalyzer()
    whole.feed(scalars)
    first, cut = RunAnalyzer(), len(scalars) // 2
    first.feed(scalars[:cut])
    resumed = RunAnalyzer()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    decisions = resumed.feed(scalars[cut:])
    assert resumed.findings == whole.findings[len(first.findings) :]
    assert first.decisions + decisions == whole.decisions


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            ["lrwatch/loss", "train/loss", "val/loss", "lrwatch/lr"],
            {"loss": "lrwatch/loss", "metric": "val/loss", "lr": "lrwatch/lr"},
        ),
        (
            ["train_loss", "val_loss", "lr-AdamW", "lr-AdamW/pg2", "grad_2.0_norm_total"],
            {"loss": "train_loss", "metric": "val_loss", "lr": "lr-AdamW",
             "grad_norm": "grad_2.0_norm_total"},
        ),
        (
            ["train/loss", "eval/loss", "train/learning_rate", "train/grad_norm"],
            {"loss": "train/loss", "metric": "eval/loss", "lr": "train/learning_rate",
             "grad_norm": "train/grad_norm"},
        ),
        (["accuracy", "epoch"], {}),
    ],
    ids=["lrwatch", "lightning", "huggingface", "nothing-usable"],
)  # fmt: skip
def test_roles_prefer_lrwatch_tags_and_know_other_loggers(
    tags: list[str], expected: dict[str, str]
) -> None:
    assert assign(tags) == expected


def test_roles_configured_metric_replaces_the_validation_aliases() -> None:
    assert assign(["val/loss", "acc/val"], metric="acc/val")["metric"] == "acc/val"
    assert "metric" not in assign(["val/loss"], metric="acc/val")


def test_analyzer_monitors_validation_loss_when_the_run_has_one() -> None:
    analyzer = RunAnalyzer()
    analyzer.feed([Scalar("train/loss", 1, 0.0, 1.0), Scalar("eval/loss", 1, 0.0, 1.0)])
    assert analyzer.metric == "eval/loss"
    assert analyzer.advice_only
    analyzer = RunAnalyzer(load_config(overrides={"metric": "lrwatch/loss"}))
    analyzer.feed([Scalar(schema.LOSS, 1, 0.0, 1.0), Scalar("val/loss", 1, 0.0, 1.0)])
    assert analyzer.metric == schema.LOSS
    assert not analyzer.advice_only


def test_analyzer_plateau_on_a_flat_validation_loss() -> None:
    analyzer = RunAnalyzer(load_config(overrides={"plateau": {"patience": 3}}))
    vals = [1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7]
    analyzer.feed([Scalar("val/loss", 100 * (i + 1), 0.0, v) for i, v in enumerate(vals)])
    plateaus = [f for f in analyzer.findings if f.kind is Kind.PLATEAU]
    assert [f.step for f in plateaus] == [600]  # third bad check in a row (lrwatch semantics)


# ------------------------------------------------------------------ analyze_run on real files
def write_run(run_dir: Path, scalars: list[Scalar]) -> Path:
    with SummaryWriter(str(run_dir)) as w:
        for s in scalars:
            w.add_scalar(s.tag, s.value, s.step)
    return run_dir


def test_analyze_run_reads_a_plain_summarywriter_run(tmp_path: Path) -> None:
    scalars = [
        Scalar(t.replace("lrwatch/loss", "train/loss").replace("lrwatch/grad_norm", "grad_norm"),
               s.step, 0.0, s.value)
        for s in run_series(500, blowup_at=350) for t in [s.tag]
        if t in (schema.LOSS, schema.GRAD_NORM)
    ]  # fmt: skip
    analysis = analyze_run(write_run(tmp_path / "run", scalars), load_config())
    doc = analysis.to_json()
    assert doc["metric"] == "train/loss" and doc["advice_only"] is True
    assert {f["kind"] for f in doc["findings"]} >= {"explosion", "nonfinite"}
    assert "explosion" in format_table(analysis)


def test_analyze_run_missing_empty_and_unusable_runs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(RunGone, match="does not exist"):
        analyze_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrwatchError, match="no scalars"):
        analyze_run(tmp_path / "empty")
    run = write_run(tmp_path / "odd", [Scalar("accuracy", i, 0.0, 0.5) for i in range(5)])
    with pytest.raises(NoUsableTags, match="accuracy"):
        analyze_run(run)


@pytest.mark.parametrize("seed", range(2))
def test_analyzer_explosion_gate_hides_nothing_a_check_at_every_step_finds(seed: int) -> None:
    """The gate that skips most explosion checks is exact: an independent replay that runs the
    detector at every point, with the same de-duplication, finds the same episodes."""
    rng = np.random.default_rng(seed)
    n = 1000
    loss = 3.0 * np.exp(-np.arange(n) / 200) + 0.5 + 0.05 * rng.standard_normal(n)
    for at in rng.choice(np.arange(50, n), size=12, replace=False):
        loss[at : at + rng.integers(1, 6)] *= rng.choice([1.8, 2.5, 4.0, 20.0])
    scalars = [Scalar(schema.LOSS, i + 1, 0.0, float(v)) for i, v in enumerate(loss)]
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    got = [(f.step, f.severity) for f in analyzer.findings if f.kind is Kind.EXPLOSION]

    detector, steps = analyzer.config.explosion, np.arange(1, n + 1)
    want, active = [], None
    for i in range(n):
        lo = max(0, i + 1 - detector.window - detector.confirm)
        scale = float(np.median(loss[: min(i + 1, 10)]))  # the loss's level at the start
        f = detector.check(steps[lo : i + 1], loss[lo : i + 1], tag=schema.LOSS, scale=scale)
        rank = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
        if f is None:
            active = None
        elif active is None or rank[f.severity] > rank[active]:
            want.append((f.step, f.severity))
            active = f.severity
    assert got == want
    assert want, "the series must contain spikes for this test to mean anything"


def test_analyzer_should_roll_back_then_stop_a_run_whose_loss_stays_nonfinite() -> None:
    """NaN from step 101 on: a cut by 10 at once; 9 steps later, not a cooldown (200 steps)
    later, a rollback to step 100, the last finite loss; NaN still 40 steps after that (the
    rollback was not taken, as in this replay): a stop naming step 100."""
    scalars = []
    for step in range(1, 200):
        loss = 1.0 / step + 0.5 if step <= 100 else math.nan
        scalars += [Scalar(schema.LOSS, step, 0.0, loss), Scalar(schema.LR, step, 0.0, 0.1)]
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    acts = [(d.step, d.action.value) for d in analyzer.decisions]
    assert acts[0] == (101, "lr_cut")
    [back] = [d for d in analyzer.decisions if d.action is ActionKind.ROLLBACK]
    assert (back.step, back.to_step) == (110, 100)
    stop = [d for d in analyzer.decisions if d.action is ActionKind.STOP]
    assert [d.step for d in stop] == [150]
    assert "the last good step is 100" in stop[0].reason


def test_analyzer_should_roll_back_at_once_on_nonfinite_weights_and_stop_if_they_stay() -> None:
    scalars = []
    for step in range(1, 100):
        weights = 10.0 if step < 50 else math.inf
        scalars += [
            Scalar(schema.LOSS, step, 0.0, 1.0),
            Scalar(schema.WEIGHT_NORM, step, 0.0, weights),
        ]
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    back, stop = analyzer.decisions
    assert (back.step, back.action, back.to_step) == (50, ActionKind.ROLLBACK, 49)
    assert (stop.step, stop.action) == (90, ActionKind.STOP)
    assert "weights are non-finite" in stop.reason and "last good step is 49" in stop.reason


def test_analyzer_should_stop_when_the_loss_goes_nonfinite_again_after_a_rollback() -> None:
    """NaN at 101-120 (rolled back at 110, taking effect at 121), finite until 200, NaN again
    from 201: the rollback did not help for long, so a stop 10 points into the new streak."""
    scalars = []
    for step in range(1, 260):
        bad = 101 <= step <= 120 or step > 200
        loss = math.nan if bad else 1.0 / step + 0.5
        scalars += [Scalar(schema.LOSS, step, 0.0, loss), Scalar(schema.LR, step, 0.0, 0.1)]
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    acts = [(d.step, d.action) for d in analyzer.decisions if d.action is not ActionKind.CLIP]
    assert acts == [(101, ActionKind.LR_CUT), (110, ActionKind.ROLLBACK), (210, ActionKind.STOP)]
    assert "the last good step is 200" in analyzer.decisions[-1].reason


def test_an_unapplied_gentle_cut_does_not_silence_a_later_explosion() -> None:
    """Recommend mode: a plateau's halving was advised and not taken (the logged LR stays). A
    blow-up 100 steps later asks for a deeper cut; it must get one, not "never applied"."""
    scalars = []
    for step in range(1, 301):
        loss = 0.5 + 0.01 * ((step * 7) % 5) + (500.0 if step >= 250 else 0.0)
        scalars += [Scalar(schema.LOSS, step, 0.0, loss), Scalar(schema.LR, step, 0.0, 0.1)]
        if step % 10 == 0:
            scalars.append(Scalar("val/loss", step, 0.0, 0.6 if step > 20 else 1.0 - step / 100))
    analyzer = RunAnalyzer()
    analyzer.feed(scalars)
    acts = [(d.step, d.action.value, d.factor) for d in analyzer.decisions]
    plateau = [a for a in acts if a[1] == "lr_cut" and a[2] == 2]
    assert plateau and plateau[0][0] < 250, acts  # the gentle cut came first, unapplied
    deep = [a for a in acts if a[0] >= 250 and a[1] == "lr_cut" and (a[2] or 0) >= 5]
    assert deep, acts


@pytest.mark.parametrize("case", ["improving", "stalls", "large_updates"])
def test_raise_lr_advice_is_overruled_by_a_stalled_validation_or_large_updates(case: str) -> None:
    """A training loss falling in a straight line from the start is slow-progress advice, but
    not once the validation loss has gone 5 checks without a new best (the run is fitting its
    training set: a higher LR would only do that faster), nor while the update ratio sits above
    the ratio rule's 0.03 (updates already far above ~1e-3 of the weights). Each overruled case
    is advised at step 100 without its rule (lrwatch/analysis/advice_guard.py)."""
    rng = np.random.default_rng(0)
    points = []
    for step in range(1, 401):
        points.append(Scalar(schema.LOSS, step, 0.0, 3.0 - 0.005 * step + rng.normal(0, 0.02)))
        points.append(Scalar(schema.LR, step, 0.0, 1e-4))
        if case == "large_updates":
            points.append(Scalar(schema.UPDATE_RATIO, step, 0.0, 0.05))
        if step % 10 == 0:
            # stalling: a hair above its best from step 50 on, never a new best (nor overfit)
            stalls = case == "stalls" and step > 40
            val = 1.921 + 0.005 * rng.random() if stalls else 2.0 - 0.002 * step
            points.append(Scalar("val/loss", step, 0.0, val))
    a = RunAnalyzer()
    decisions = a.feed(points)
    assert any(f.kind is Kind.SLOW_PROGRESS for f in a.findings)
    advised = [d for d in decisions if d.action is ActionKind.RAISE_LR_ADVICE]
    assert (advised != []) is (case == "improving"), [d.reason for d in decisions]
    said = " ".join(a.why_quiet.values())
    want = {"stalls": "val/loss has gone 5 checks", "large_updates": "ratio's median is above"}
    assert (want[case] in said) if case in want else "no raise-LR advice" not in said
