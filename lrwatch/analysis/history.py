"""Bounded per-series memory of a run: recent windows, running best, thinned whole-run history.

A run can log millions of points per tag; the detectors only need a recent window, the best value
so far and, for reports, a thinned picture of the whole run. :class:`History` keeps exactly that,
so memory per series stays bounded however long the run is.

A restarted trainer that resumes from a checkpoint logs steps again that were already seen. As in
TensorBoard's purge of orphaned data, a point whose step is older than or equal to the series' last
step discards every kept point at that step or later before it is added: the window, the thinned
history and ``last`` then describe the resumed timeline, not the abandoned one. ``count`` still
counts every point ever seen. If the purged points held the running best, the best is recomputed
from what is still kept (the window and the thinned history), so it can be slightly less extreme
than the true best of the surviving timeline.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from lrwatch.errors import ConfigError
from lrwatch.schema import Scalar

Mode = Literal["min", "max"]


class _Series:
    """One tag's bounded memory. Owned by :class:`History`, never handed out."""

    __slots__ = (
        "steps",
        "values",
        "count",
        "last",
        "best",
        "ds_steps",
        "ds_values",
        "stride",
        "phase",
    )

    def __init__(self, window: int) -> None:
        self.steps: deque[int] = deque(maxlen=window)
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0  # points ever seen, purged ones included
        self.last: Scalar | None = None
        self.best: dict[str, tuple[int, float] | None] = {"min": None, "max": None}
        self.ds_steps: list[int] = []  # every stride-th point of the timeline
        self.ds_values: list[float] = []
        self.stride = 1
        self.phase = 0  # points since the last one kept in ds_*

    def add(self, s: Scalar, max_points: int) -> None:
        step, value = s.step, s.value
        if self.last is not None and step <= self.last.step:
            self._purge_from(step)
        self.count += 1
        self.last = s
        self.steps.append(step)
        self.values.append(value)
        if math.isfinite(value):
            best = self.best
            lo, hi = best["min"], best["max"]
            if lo is None or value < lo[1]:
                best["min"] = (step, value)
            if hi is None or value > hi[1]:
                best["max"] = (step, value)
        if self.phase:
            self.phase = (self.phase + 1) % self.stride
            return
        self.ds_steps.append(step)
        self.ds_values.append(value)
        if len(self.ds_steps) >= max_points:  # keep every other point, halve the rate
            del self.ds_steps[1::2], self.ds_values[1::2]
            self.stride *= 2
        self.phase = 1 % self.stride

    def add_run(
        self, points: list[Scalar], steps: list[int], values: np.ndarray, max_points: int
    ) -> None:
        """:meth:`add` for each of ``points`` at once, with the same resulting state.

        The batch analysis path (:mod:`lrwatch.analysis.batch`) calls it only for points whose
        steps rise strictly and follow ``last``, so nothing is purged. ``steps`` and ``values``
        (float64) are theirs.
        """
        floats = values.tolist()
        self.count += len(points)
        self.last = points[-1]
        self.steps.extend(steps)
        self.values.extend(floats)
        finite = np.flatnonzero(np.isfinite(values))
        if finite.size:  # the first point of the lowest (highest) value, as add keeps it
            lo = int(finite[np.argmin(values[finite])])
            hi = int(finite[np.argmax(values[finite])])
            best = self.best
            if best["min"] is None or floats[lo] < best["min"][1]:
                best["min"] = (steps[lo], floats[lo])
            if best["max"] is None or floats[hi] > best["max"][1]:
                best["max"] = (steps[hi], floats[hi])
        self._thin_run(steps, floats, max_points)

    def _thin_run(self, steps: list[int], values: list[float], max_points: int) -> None:
        """The thinned history's part of :meth:`add_run`: every ``stride``-th point is kept."""
        i = (self.stride - self.phase) % self.stride  # the next point add would keep
        last_kept = None
        while i < len(steps):
            self.ds_steps.append(steps[i])
            self.ds_values.append(values[i])
            if len(self.ds_steps) >= max_points:
                del self.ds_steps[1::2], self.ds_values[1::2]
                self.stride *= 2
            last_kept = i
            i += self.stride
        if last_kept is None:
            self.phase = (self.phase + len(steps)) % self.stride
        else:
            self.phase = (len(steps) - last_kept) % self.stride

    def _purge_from(self, step: int) -> None:
        """Forget every kept point at ``step`` or later (a resumed trainer rewrites them)."""
        while self.steps and self.steps[-1] >= step:
            self.steps.pop()
            self.values.pop()
        while self.ds_steps and self.ds_steps[-1] >= step:
            self.ds_steps.pop()
            self.ds_values.pop()
        self.phase = 0
        for mode, best in self.best.items():
            if best is not None and best[0] >= step:
                self.best[mode] = self._best_kept(mode)

    def _best_kept(self, mode: str) -> tuple[int, float] | None:
        points = [
            (st, v)
            for st, v in zip(
                [*self.ds_steps, *self.steps], [*self.ds_values, *self.values], strict=True
            )
            if math.isfinite(v)
        ]
        if not points:
            return None
        pick = min if mode == "min" else max
        return pick(points, key=lambda p: p[1])


class History:
    """Bounded memory of every scalar series of a run.

    Args:
        window: most recent points kept per tag at full resolution (what detectors look at).
        max_points: size of the thinned whole-run history per tag (for reports and plots).

    Example::

        history = History(window=512)
        history.extend(run_reader.poll())
        steps, losses = history.window("lrwatch/loss", 100)
    """

    def __init__(self, *, window: int = 512, max_points: int = 2048) -> None:
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if max_points < 4:
            raise ConfigError(f"max_points must be >= 4, got {max_points}")
        self._window = window
        self._max_points = max_points
        self._series: dict[str, _Series] = {}

    def extend(self, scalars: Iterable[Scalar]) -> None:
        """Add points in the order they were read (per tag: the order they were logged)."""
        series, window, max_points = self._series, self._window, self._max_points
        for s in scalars:
            one = series.get(s.tag)
            if one is None:
                one = series[s.tag] = _Series(window)
            one.add(s, max_points)

    def extend_run(
        self, tag: str, points: list[Scalar], steps: list[int], values: np.ndarray
    ) -> None:
        """Add one tag's points at once, as :meth:`extend` would (steps rising after its last)."""
        one = self._series.get(tag)
        if one is None:
            one = self._series[tag] = _Series(self._window)
        one.add_run(points, steps, values, self._max_points)

    def tags(self) -> list[str]:
        return sorted(self._series)

    def window(self, tag: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps int64, values float64) of the ``n`` most recent points (default: all kept)."""
        one = self._series.get(tag)
        if one is None:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        steps = np.fromiter(one.steps, np.int64, len(one.steps))
        values = np.fromiter(one.values, np.float64, len(one.values))
        if n is not None:
            steps, values = (
                steps[len(steps) - min(n, len(steps)) :],
                values[len(values) - min(n, len(values)) :],
            )
        return steps, values

    def last(self, tag: str) -> Scalar | None:
        one = self._series.get(tag)
        return None if one is None else one.last

    def count(self, tag: str) -> int:
        """Points ever seen for ``tag``, including ones a resumed trainer logged again."""
        one = self._series.get(tag)
        return 0 if one is None else one.count

    def best(self, tag: str, mode: Mode = "min") -> tuple[int, float] | None:
        """Running best (step, value) over finite values, or None if there is none."""
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        one = self._series.get(tag)
        return None if one is None else one.best[mode]

    def downsampled(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole-run history thinned to at most ``max_points`` points, always ending at the last."""
        one = self._series.get(tag)
        if one is None or one.last is None:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        steps, values = list(one.ds_steps), list(one.ds_values)
        if steps[-1] != one.last.step:
            steps.append(one.last.step)
            values.append(one.last.value)
        if len(steps) > self._max_points:  # the last point replaces the newest thinned one
            del steps[-2], values[-2]
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def state_dict(self) -> dict[str, Any]:
        """Everything kept, as plain lists (JSON-able; non-finite floats need ``allow_nan``)."""
        return {
            "window": self._window,
            "max_points": self._max_points,
            "series": {tag: _series_state(one) for tag, one in self._series.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window = int(state["window"])
        self._max_points = int(state["max_points"])
        self._series = {
            tag: _series_from(tag, doc, self._window) for tag, doc in state["series"].items()
        }


def _series_state(one: _Series) -> dict[str, Any]:
    last = one.last
    return {
        "steps": list(one.steps),
        "values": list(one.values),
        "count": one.count,
        "last": None if last is None else [last.step, last.wall_time, last.value],
        "best": {mode: None if b is None else list(b) for mode, b in one.best.items()},
        "ds_steps": list(one.ds_steps),
        "ds_values": list(one.ds_values),
        "stride": one.stride,
        "phase": one.phase,
    }


def _series_from(tag: str, doc: dict[str, Any], window: int) -> _Series:
    one = _Series(window)
    one.steps.extend(int(s) for s in doc["steps"])
    one.values.extend(float(v) for v in doc["values"])
    one.count = int(doc["count"])
    if doc["last"] is not None:
        step, wall_time, value = doc["last"]
        one.last = Scalar(tag, int(step), float(wall_time), float(value))
    one.best = {
        mode: None if b is None else (int(b[0]), float(b[1])) for mode, b in doc["best"].items()
    }
    one.ds_steps = [int(s) for s in doc["ds_steps"]]
    one.ds_values = [float(v) for v in doc["ds_values"]]
    one.stride = int(doc["stride"])
    one.phase = int(doc["phase"])
    return one
