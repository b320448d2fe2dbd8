"""History: bounded memory per series, purge on resumed steps, checked against a slow model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrwatch.analysis.history import History
from lrwatch.errors import ConfigError
from lrwatch.schema import Scalar


def points(tag: str, steps: range | list[int], values: list[float] | None = None) -> list[Scalar]:
    vals = values if values is not None else [float(s) for s in steps]
    return [Scalar(tag, s, 100.0 + s, v) for s, v in zip(steps, vals, strict=True)]


class SlowModel:
    """The obvious unbounded implementation: a list per tag, purged on a step going back."""

    def __init__(self) -> None:
        self.timeline: dict[str, list[Scalar]] = {}

    def extend(self, scalars: list[Scalar]) -> None:
        for s in scalars:
            line = self.timeline.setdefault(s.tag, [])
            while line and line[-1].step >= s.step:
                line.pop()
            line.append(s)

    def best(self, tag: str, mode: str) -> tuple[int, float] | None:
        finite = [(s.step, s.value) for s in self.timeline.get(tag, []) if math.isfinite(s.value)]
        if not finite:
            return None
        pick = min if mode == "min" else max
        return pick(finite, key=lambda p: p[1])  # first of equal values, like a strict "<"


def test_history_window_is_the_most_recent_points_in_step_order() -> None:
    h = History(window=10)
    h.extend(points("loss", range(25)))
    steps, values = h.window("loss")
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == list(range(15, 25))
    assert h.window("loss", 3)[0].tolist() == [22, 23, 24]
    assert h.window("loss", 100)[0].tolist() == list(range(15, 25))
    assert h.window("missing")[0].size == 0
    assert h.last("loss") == Scalar("loss", 24, 124.0, 24.0)
    assert h.count("loss") == 25 and h.count("missing") == 0
    assert h.tags() == ["loss"]


def test_history_memory_stays_bounded_on_a_long_run() -> None:
    h = History(window=64, max_points=100)
    everything = np.random.default_rng(0).normal(size=200_000).tolist()
    sizes = {"a": 200_000, "b": 2_000}
    for tag, n in sizes.items():
        h.extend(points(tag, range(n), everything[:n]))
    state = h.state_dict()
    for tag, n in sizes.items():
        values = everything[:n]
        doc = state["series"][tag]
        assert len(doc["steps"]) == 64
        assert len(doc["ds_steps"]) < 100
        steps, vals = h.downsampled(tag)
        assert 25 <= len(steps) <= 100
        assert steps[0] == 0 and steps[-1] == n - 1
        assert np.all(np.diff(steps) > 0)
        assert np.all(vals == np.asarray(values)[steps])  # thinned, never averaged
        assert h.count(tag) == n
        assert h.best(tag, "min") == (int(np.argmin(values)), min(values))
        assert h.best(tag, "max") == (int(np.argmax(values)), max(values))


def test_history_best_ignores_non_finite_values() -> None:
    h = History()
    h.extend(points("loss", range(4), [math.nan, 3.0, -math.inf, 2.0]))
    assert h.best("loss", "min") == (3, 2.0)
    assert h.best("loss", "max") == (1, 3.0)
    h.extend(points("nan", [0], [math.nan]))
    assert h.best("nan") is None
    assert math.isnan(h.window("nan")[1][0])  # detectors still see the NaN
    with pytest.raises(ConfigError):
        h.best("loss", "median")  # type: ignore[arg-type]


def test_history_resumed_steps_purge_the_abandoned_timeline() -> None:
    h = History(window=1000)
    first = points("loss", range(100), [100.0 - s for s in range(100)])  # best (min) at step 99
    resumed = points("loss", range(50, 80), [500.0 + s for s in range(30)])
    h.extend(first + resumed)
    steps, values = h.window("loss")
    assert steps.tolist() == list(range(80))
    assert values[50:].tolist() == [500.0 + s for s in range(30)]
    assert h.last("loss") == resumed[-1]
    assert h.count("loss") == 130
    assert h.best("loss", "min") == (49, 51.0)  # step 99 was orphaned
    assert h.downsampled("loss")[0][-1] == 79


def test_history_equal_step_replaces_the_point() -> None:
    h = History()
    h.extend(points("loss", [0, 1, 1], [5.0, 4.0, 3.0]))
    assert h.window("loss")[1].tolist() == [5.0, 3.0]


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(min_value=0, max_value=60),
            st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf])),
        ),
        max_size=150,
    )
)
def test_history_agrees_with_the_slow_model(ops: list[tuple[str, int, float]]) -> None:
    scalars = [Scalar(tag, step, 0.0, value) for tag, step, value in ops]
    h, model = History(window=1000, max_points=8), SlowModel()
    h.extend(scalars)
    model.extend(scalars)
    for tag, line in model.timeline.items():
        steps, values = h.window(tag)
        assert steps.tolist() == [s.step for s in line]
        np.testing.assert_array_equal(values, [s.value for s in line])
        assert h.window(tag, 3)[0].tolist() == [s.step for s in line[-3:]]
        assert h.last(tag) == line[-1]
        for mode in ("min", "max"):
            assert h.best(tag, mode) == model.best(tag, mode)
        ds_steps, _ = h.downsampled(tag)
        assert len(ds_steps) <= 8 and set(ds_steps.tolist()) <= {s.step for s in line}
        assert ds_steps[-1] == line[-1].step


def test_history_state_dict_round_trips_through_json() -> None:
    rng = np.random.default_rng(1)
    h = History(window=32, max_points=16)
    h.extend(points("a", range(300), rng.normal(size=300).tolist()))
    h.extend(points("b", [0, 1, 2, 1], [1.0, math.nan, 3.0, 4.0]))
    restored = History()
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    more = points("a", range(290, 400), rng.normal(size=110).tolist()) + points("b", [5], [0.5])
    h.extend(more)
    restored.extend(more)
    assert restored.state_dict() == json.loads(json.dumps(h.state_dict()))
    for tag in ("a", "b"):
        for got, want in zip(restored.window(tag), h.window(tag), strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(restored.downsampled(tag), h.downsampled(tag), strict=True):
            np.testing.assert_array_equal(got, want)
        assert restored.last(tag) == h.last(tag)
        assert restored.count(tag) == h.count(tag)
        assert restored.best(tag, "max") == h.best(tag, "max")


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"max_points": 1}])
def test_history_rejects_bad_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        History(**kwargs)
