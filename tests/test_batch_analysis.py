"""Differential test of batch analysis: the batch path and the point-by-point path must agree.

Both analyzers (``RunAnalyzer(batch=True)`` and ``batch=False``, the reference) are fed the same
streams in the same reads, and must end with the same findings (kind, severity, step, tag,
message, evidence), the same decisions, the same reasons for silence and the same saved state.
Streams: random hook-like runs (random walks, spikes, NaN/Inf holes, ties, flat stretches,
blow-ups, high and low update ratios, LR cuts with their acks, resumed steps, late tags, AMP),
cut into reads of every size and judged with chunks of 1 step up to whole runs; and real
trainings recorded by the hook. The batch twins are found, not listed: every method whose
docstring starts "Batch twin of" on a detector of ``AnalyzerConfig`` (and the explosion gate),
and each is shown to matter by breaking it and watching this comparison fail.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lrwatch import schema
from lrwatch.analysis import batch
from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.analysis.config import AnalyzerConfig
from lrwatch.analysis.explosion_gate import ExplosionGate
from lrwatch.schema import Kind, Scalar

Feed = tuple[list[list[Scalar]], bool]  # the reads, and whether they are fed live


# ------------------------------------------------------------------------------ streams
def _loss(rng: np.random.Generator, n: int, shape: str | None) -> np.ndarray:
    shape = shape or rng.choice(["decay", "walk", "flat", "oscillate", "diverge", "ties"])
    t = np.arange(n)
    if shape == "decay":
        loss = 3 * np.exp(-t / rng.uniform(50, 800)) + 0.5 + rng.uniform(0, 0.2) * rng.random(n)
    elif shape == "walk":
        loss = np.exp(np.cumsum(rng.normal(0, rng.uniform(0.01, 0.2), n)))
    elif shape == "flat":
        loss = np.full(n, rng.uniform(0.1, 3))
    elif shape == "oscillate":
        loss = 1 + 0.2 * (-1.0) ** t + 0.05 * rng.random(n)
    elif shape == "late_oscillate":  # falls, then bounces from step 350 on
        loss = 1 + 2 * np.exp(-np.minimum(t, 350) / 50) + 0.2 * (t >= 350) * (-1.0) ** t
        loss += 0.05 * rng.random(n)
    elif shape == "ties":
        loss = np.round(2 * np.exp(-t / 300) + rng.random(n) * 0.3, 1)
    else:
        at = int(rng.integers(n // 4, n))
        loss = 2 * np.exp(-t / 200) + 0.3 + 0.02 * rng.random(n)
        with np.errstate(over="ignore"):  # blows up to inf, as a real run does
            loss[at:] *= np.exp(rng.uniform(0.05, 1.5) * (t[at:] - at + 1))
    for _ in range(int(rng.integers(0, 6))):  # spikes, and a few runs of them
        at, width = int(rng.integers(0, n)), int(rng.integers(1, 5))
        loss[at : at + width] *= rng.choice([3.0, 12.0, 1e3])
    for _ in range(int(rng.integers(0, 4))):
        loss[int(rng.integers(0, n))] = rng.choice([np.nan, np.inf, -np.inf])
    return loss


def random_run(
    seed: int, *, shape: str | None = None, ratio: float | None = None, plain: bool = False
) -> list[Scalar]:
    """A hook-like run: per step loss, nonfinite flag, (grad norm), LR last; per logging step
    update ratio and weight norm; sometimes validation loss, AMP, a cut and its ack, a resume.
    ``shape`` and ``ratio`` force the loss's shape and the update ratio's level; ``plain``: none
    of the extras, whose steps the point path judges anyway."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 900)) if shape != "late_oscillate" else 900
    loss = _loss(rng, n, shape)
    every = int(rng.choice([1, 2, 5, 10]))
    ratio_level = ratio or float(rng.choice([1e-3, 6e-3, 2e-2, 8e-2, 1e-5]))
    lr = np.full(n, 0.1)
    cut = int(rng.integers(1, n)) if rng.random() < 0.4 and not plain else None
    if cut is not None:
        lr[cut:] /= 10
    late_grad = int(rng.integers(0, n)) if rng.random() < 0.3 else 0
    val_every = 0 if plain else int(rng.choice([0, 0, 20, 100]))
    val_drift = float(rng.choice([0.0, 0.01]))  # a validation loss that rises: overfitting
    amp = rng.random() < 0.15 and not plain
    out: list[Scalar] = []
    for i in range(n):
        step = i + 1
        row = [(schema.LOSS, loss[i]), (schema.NONFINITE, float(not math.isfinite(loss[i])))]
        if i >= late_grad:
            row.append((schema.GRAD_NORM, abs(loss[i]) * rng.uniform(0.5, 2)))
        if step % every == 0:
            hole = rng.random() < 0.02 and not plain
            r = np.nan if hole else ratio_level * rng.uniform(0.5, 2)
            row += [(schema.UPDATE_RATIO, r), (schema.WEIGHT_NORM, 30.0)]
        if val_every and step % val_every == 0:
            val = np.nanmean(loss[max(0, i - 20) : i + 1]) + val_drift * step
            row.append(("val/loss", float(val)))
        if amp:
            row += [(schema.LOSS_SCALE, 2.0 ** rng.integers(-1, 16)), (schema.SKIPPED, 0.0)]
        if cut is not None and step == cut + 1:
            row.append((schema.LR_FACTOR, 10.0))
        row.append((schema.LR, lr[i]))
        out += [Scalar(tag, step, 0.0, float(v)) for tag, v in row]
    if rng.random() < 0.15 and not plain:  # a resumed trainer logs some steps again
        back = int(rng.integers(1, 40))
        out += [Scalar(s.tag, s.step, 1.0, s.value * 1.01) for s in out if s.step > n - back]
    return out


def reads(scalars: list[Scalar], rng: np.random.Generator) -> list[list[Scalar]]:
    """``scalars`` cut into reads of random sizes (1 scalar up to all of them)."""
    out, i = [], 0
    while i < len(scalars):
        size = int(rng.choice([1, 3, 17, 200, 5000, len(scalars)]))
        out.append(scalars[i : i + size])
        i += size
    return out


def feeds(seed: int) -> Iterator[Feed]:
    """In random reads, and in random reads as the daemon feeds a live run."""
    scalars = random_run(seed)
    rng = np.random.default_rng(seed + 10_000)
    yield reads(scalars, rng), False
    yield reads(scalars, rng), True


# ------------------------------------------------------------------------------ comparison
def outcome(analyzer: RunAnalyzer) -> dict[str, Any]:
    return {
        "findings": [
            (f.kind, f.severity, f.step, f.tag, f.message, f.evidence) for f in analyzer.findings
        ],
        "decisions": analyzer.decisions,
        "why_quiet": analyzer.why_quiet,
        "state": json.dumps(analyzer.state_dict(), sort_keys=True, default=str),
    }


def run(feed: Feed, *, batch_on: bool, config: AnalyzerConfig | None = None) -> RunAnalyzer:
    analyzer = RunAnalyzer(config, batch=batch_on)
    chunks, live = feed
    for chunk in chunks:
        analyzer.feed(chunk, live=live, hooked=live)
    analyzer.feed([])  # a last call judges what a live feed still held
    return analyzer


def assert_same(
    feed: Feed, config: AnalyzerConfig | None = None, *, ref: dict[str, Any] | None = None
) -> RunAnalyzer:
    ref = ref or outcome(run(feed, batch_on=False, config=config))
    analyzer = run(feed, batch_on=True, config=config)
    got = outcome(analyzer)
    assert len(got["findings"]) == len(ref["findings"])
    for g, r in zip(got["findings"], ref["findings"], strict=True):
        assert g[:5] == r[:5]
        assert g[5].keys() == r[5].keys()
        for key, value in r[5].items():
            if isinstance(value, float):
                assert g[5][key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
            else:
                assert g[5][key] == value, key
    assert got["decisions"] == ref["decisions"]
    assert got["why_quiet"] == ref["why_quiet"]
    assert got["state"] == ref["state"]
    return analyzer


def differs(i: int) -> bool:
    """Whether the batch path differs from the point path on corpus stream ``i``."""
    try:
        assert_same(([corpus()[i]], False), ref=reference(i))
    except AssertionError:
        return True
    return False


SEEDS = range(30)
# Streams where one detector acts alone: an oscillation seen by its alternation with a healthy
# update ratio, and blow-ups between logging steps.
FORCED = [(seed, shape, 1e-3) for shape in ("oscillate", "diverge") for seed in range(4)]
FORCED += [(seed, "late_oscillate", 1e-3) for seed in range(2)]  # between slow_progress checks


@functools.cache
def corpus() -> list[list[Scalar]]:
    forced = [random_run(seed, shape=shape, ratio=r, plain=True) for seed, shape, r in FORCED]
    return [random_run(seed) for seed in SEEDS] + forced


@functools.cache
def reference(i: int) -> dict[str, Any]:
    """The point path's outcome on corpus stream ``i``, fed whole (it calls no batch twin)."""
    return outcome(run(([corpus()[i]], False), batch_on=False))


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", SEEDS)
def test_batch_equals_point_by_point_on_random_streams(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not differs(seed)  # fed whole
    for feed in feeds(seed):
        assert_same(feed)
        monkeypatch.setattr(batch, "MIN_POINTS", 0)  # small reads through the batch path too
        monkeypatch.setattr(batch, "DENSE", 2.0)  # and busy chunks
        assert_same(feed)
        monkeypatch.undo()


def test_batch_equals_point_by_point_on_single_detector_streams() -> None:
    for i in range(len(SEEDS), len(corpus())):
        assert not differs(i)


@pytest.mark.parametrize("chunk_points", [1, 2, 3, 7, 64])
def test_every_chunk_boundary(chunk_points: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of one step (a chunk of 1 point ends at its step), a few, splitting every
    detector's window at every position."""
    monkeypatch.setattr(batch, "CHUNK_POINTS", chunk_points)
    monkeypatch.setattr(batch, "MIN_POINTS", 0)
    monkeypatch.setattr(batch, "DENSE", 2.0)
    for i in range(8):
        assert not differs(i)


def test_the_streams_exercise_every_finding_kind() -> None:
    """The random streams make every kind of finding somewhere, so every detector's batch
    twin is compared where it matters (a new kind fails here until a stream makes it)."""
    kinds = set()
    for i in range(len(corpus())):
        kinds |= {kind for kind, *_ in reference(i)["findings"]}
    assert kinds == set(Kind)


def twins() -> Iterator[tuple[type, str]]:
    """Every batch twin: methods documented "Batch twin of ..." on the detectors of
    AnalyzerConfig, and on the explosion gate."""
    classes = {type(getattr(AnalyzerConfig(), f.name)) for f in dataclasses.fields(AnalyzerConfig)}
    for cls in sorted(classes | {ExplosionGate}, key=lambda c: c.__name__):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if (fn.__doc__ or "").startswith("Batch twin of"):
                yield cls, name


def _broken(cls: type, name: str) -> Callable[..., Any]:
    """The twin made to say "nothing can happen here" everywhere."""
    original = getattr(cls, name)
    if name == "run_through":  # counts the points, admits none

        def through(self: Any, values: Any, *args: Any) -> int:
            for value in values:
                self.rises = self.rises + 1 if value > self.prev else 0
                self.prev, self.since = value, self.since + 1
            return len(values)

        return through
    ret = inspect.signature(original).return_annotation

    def nothing(self: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
        if "bool" in str(ret) and "NDArray" not in str(ret):
            return False
        size = np.asarray(values).size
        return np.ones(size, bool) if name.startswith("quiet") else np.zeros(size, bool)

    return nothing


@pytest.mark.parametrize(("cls", "name"), list(twins()), ids=lambda x: getattr(x, "__name__", x))
def test_a_broken_twin_is_caught(cls: type, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "DENSE", 2.0)  # no chunk handed whole to the point path
    monkeypatch.setattr(cls, name, _broken(cls, name))
    assert any(differs(i) for i in range(len(corpus())))


def test_twins_are_found() -> None:
    found = {f"{cls.__name__}.{name}" for cls, name in twins()}
    assert {"ExplosionDetector.could_fire", "ExplosionGate.run_through"} <= found


def test_a_detector_without_a_batch_twin_falls_back_to_point_by_point() -> None:
    """A detector AnalyzerConfig holds that the batch path does not know: point by point."""

    @dataclasses.dataclass(frozen=True)
    class WithNewRule(AnalyzerConfig):
        future_rule: Any = None

    config = WithNewRule()
    assert not batch.supported(config)
    analyzer = assert_same(([random_run(3)], False), config)
    assert analyzer._batch is None
    assert batch.supported(AnalyzerConfig())


# ------------------------------------------------------------------------------ real runs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.mark.slow
def test_batch_equals_point_by_point_on_real_trainings(tmp_path: Path) -> None:
    from scenario_runs import Recipe, train, warmup_to

    from lrwatch.events.reader import read_run

    recipes = {
        "diverging": Recipe("diabetes", (64,), "sgd", 0.01, 500, schedule=warmup_to(150, 300)),
        "oscillating": Recipe("diabetes", (64,), "sgd", 0.15, 500),
        "healthy": Recipe("digits", (128,), "adam", 1e-3, 300),
    }
    kinds = set()
    for name, recipe in recipes.items():
        train(recipe, tmp_path / name, log_every=5)
        scalars = read_run(tmp_path / name)
        rng = np.random.default_rng(0)
        for feed in ([scalars], False), (reads(scalars, rng), True):
            kinds |= {f.kind for f in assert_same(feed).findings}
    assert {Kind.EXPLOSION, Kind.NONFINITE} <= kinds


def cut_then_jump(*, every: int = 1, ack: bool = True) -> list[Scalar]:
    """A blow-up the analyzer answers with a cut, which the run applies at step 310 (LR / 10,
    acknowledged); from then on its update ratio jumps to 0.2 while the loss stays flat. The
    ratio check then reads only points after the cut (a short window, its early rule): the
    batch path must see that window change at the step the cut shows in the data (the
    acknowledgement, or without one the logged LR)."""
    rng = np.random.default_rng(0)
    out: list[Scalar] = []
    for step in range(1, 601):
        loss = 2.0 * math.exp(-min(step, 310) / 100) + 0.5 + 0.01 * rng.random()
        grad = 1.0 + 0.1 * rng.random()
        if 300 <= step < 303:
            grad *= 1000.0
        row = [(schema.LOSS, loss), (schema.NONFINITE, 0.0), (schema.GRAD_NORM, grad)]
        if step % every == 0:
            ratio = (1e-3 if step < 310 else 0.2) * (1 + 0.1 * rng.random())
            row.append((schema.UPDATE_RATIO, ratio))
        if step == 310 and ack:
            row.append((schema.LR_FACTOR, 10.0))
        row.append((schema.LR, 0.1 if step < 310 else 0.01))
        out += [Scalar(tag, step, 0.0, float(v)) for tag, v in row]
    return out


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("ack", [True, False])
def test_a_cut_taking_effect_between_events(every: int, ack: bool) -> None:
    analyzer = assert_same(([cut_then_jump(every=every, ack=ack)], False))
    assert any(d.action is schema.ActionKind.LR_CUT for d in analyzer.decisions)
    assert any(f.kind is Kind.RATIO_HIGH and 310 < f.step < 350 for f in analyzer.findings)
