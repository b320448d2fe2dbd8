"""Which points of a chunk the point-by-point checks must judge: the batch twin of role_checks.

:meth:`.role_checks.RoleChecks.check` runs, per new point, the detectors reading its role. Here
the same dispatch answers, for a whole chunk of one tag's points at once, at which points any
of them could report something or change a condition; :mod:`.batch` sends only those steps
through ``check``. Every answer is a necessary condition taken from the detector's own module
(``could_fire_many``, ``could_fire``, ``quiet_many``, written beside each ``check``), so a point
left out here is one where ``check`` returns nothing and changes nothing but the history, the
point counts and the explosion gate, which :mod:`.batch` advances in bulk.

Keep this dispatch in step with ``RoleChecks.check``: a role or a detector this module does not
know is judged point by point (every point an event), and :mod:`tests.test_batch_analysis`
compares both paths on every detector it finds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrwatch.analysis.history import History
from lrwatch.analysis.role_checks import RoleChecks, on_ladder
from lrwatch.analysis.roles import Role
from lrwatch.schema import Kind, Scalar

HISTORY_WINDOW = 512  # what History keeps per tag (its default), so the longest window read
_OSCILLATION_STRIDE = 2  # as in role_checks
_TREND_STRIDE = 4
_START_POINTS = 10  # as in role_checks
THINNED_FROM = 2048  # History's max_points: its thinned history is the series until then
# Conditions that, while ongoing on a tag, make every point of it an event (the check runs to
# see them continue or end); oscillation and the plateau trend only at their strided points.
_ONGOING: dict[Role, tuple[Kind, ...]] = {
    "loss": (Kind.NONFINITE, Kind.EXPLOSION, Kind.DIVERGENCE),
    "grad_norm": (Kind.NONFINITE, Kind.EXPLOSION),
    "nonfinite": (Kind.NONFINITE,),
    "weight_norm": (Kind.NONFINITE,),
    "update_ratio": (Kind.RATIO_HIGH, Kind.RATIO_LOW),
    "lr": (),
}


@dataclass
class TagRun:
    """One tag's points in a chunk, and its history before them (``ext_*`` = history + chunk)."""

    tag: str
    points: list[Scalar]
    steps: np.ndarray  # int64, strictly rising
    values: np.ndarray  # float64
    at: np.ndarray  # index of each point's step within the chunk
    ext_steps: np.ndarray
    ext_values: np.ndarray
    head: int  # index in ext_* of the chunk's first point

    @classmethod
    def build(
        cls,
        tag: str,
        points: list[Scalar],
        steps: np.ndarray,
        values: np.ndarray,
        at: np.ndarray,
        history: History,
    ) -> TagRun:
        old_steps, old_values = history.window(tag, HISTORY_WINDOW)
        return cls(
            tag,
            points,
            steps,
            values,
            at,
            np.concatenate([old_steps, steps]),
            np.concatenate([old_values, values]),
            old_steps.size,
        )

    def window(self, k: int, n: int, *, after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``history.window(tag, n)`` as it reads at chunk point ``k``; ``after``: only later
        steps (``RoleChecks._fresh``)."""
        end = self.head + k + 1
        start = max(0, end - min(n, HISTORY_WINDOW))
        s, v = self.ext_steps[start:end], self.ext_values[start:end]
        if after is not None:
            keep = s > after
            s, v = s[keep], v[keep]
        return s, v


class RoleScreens:
    """The screens of one run's checks; :meth:`events` per tag and role, from point ``k0``."""

    def __init__(self, checks: RoleChecks) -> None:
        self.checks = checks
        self.config = checks.config
        self.ratio_max: float | None = None  # see prepare

    def prepare(self, runs: dict[str, TagRun], history: History) -> None:
        """Before a screening pass over ``runs`` (the chunk's tags): the largest update ratio
        any oscillation check of the chunk can read, an upper bound of the median it takes."""
        tag = self.checks.tags.roles.get("update_ratio")
        run = None if tag is None else runs.get(tag)
        if tag is None:
            self.ratio_max = None
            return
        values = history.window(tag)[1] if run is None else run.ext_values
        finite = values[np.isfinite(values)]
        self.ratio_max = float(finite.max()) if finite.size else None

    def events(self, role: Role, run: TagRun, k0: int, counts: int) -> np.ndarray:
        """Which of ``run``'s points from ``k0`` on need ``check`` (``counts``: the tag's point
        count before point ``k0``)."""
        n = run.values.size - k0
        kinds = _ONGOING.get(role)
        if kinds is None:  # a role without a batch twin: every point through check
            return np.ones(n, dtype=bool)
        if any(self.checks.conditions.ongoing(k, run.tag) for k in kinds):
            return np.ones(n, dtype=bool)
        values = run.values[k0:]
        out = np.zeros(n, dtype=bool)
        if role in ("loss", "grad_norm", "nonfinite", "weight_norm"):
            out |= self.config.nonfinite.could_fire_many(values, tag=run.tag)
        if role == "loss":
            out |= self._loss(run, k0, counts)
        if role == "update_ratio":
            out |= self._ratio(run, k0)
        return out

    def _loss(self, run: TagRun, k0: int, counts: int) -> np.ndarray:
        c, tag = self.config, run.tag
        n = run.values.size - k0
        if not self.checks.opening_known(tag):  # its first points still set the loss's scale
            return self._until_opening(run, k0, counts)
        scale = self.checks.first_level(tag)
        out = c.divergence.could_fire_many(run.values[k0:], scale)
        number = counts + 1 + np.arange(n)  # each point's count, as check sees it
        every = max(c.oscillation.jitter_window // _OSCILLATION_STRIDE, 1)
        ongoing = self.checks.conditions.ongoing(Kind.OSCILLATION, tag)
        ratio_max = self.ratio_max
        after = self.checks.fresh_after()
        for i in np.flatnonzero(number % every == 0):
            window = run.window(k0 + int(i), c.oscillation.window, after=after)
            out[i] |= ongoing or c.oscillation.could_fire(*window, ratio_max=ratio_max)
        if self.checks.tags.metric(c.metric) == tag:  # the plateau trend: no batch twin
            out |= number % max(c.plateau_trend.window // _TREND_STRIDE, 1) == 0
        for i in np.flatnonzero(number % 10 == 0):  # slow progress, on its ladder: no twin
            out[i] |= on_ladder(int(number[i]), c.slow_progress.min_points)
        return out

    def _until_opening(self, run: TagRun, k0: int, counts: int) -> np.ndarray:
        """Every point up to the one that completes the loss's opening (its first
        ``role_checks._START_POINTS`` finite points: the check keeps them then, and the screens
        are asked again). While the history still holds the whole series unthinned, that point
        is known; otherwise all of them."""
        n = run.values.size - k0
        out = np.ones(n, dtype=bool)
        if counts >= HISTORY_WINDOW:  # the history no longer holds all of its points
            return out
        finite = np.cumsum(np.isfinite(run.ext_values[: run.head + k0 + n]))
        done = np.flatnonzero(finite >= _START_POINTS)
        if done.size and int(done[0]) < THINNED_FROM:
            out[max(int(done[0]) - run.head - k0 + 1, 0) :] = False
        return out

    def _ratio(self, run: TagRun, k0: int) -> np.ndarray:
        """Update-ratio points the ratio check must judge: all but those whose full window is
        finite and fresh with its median inside the healthy band."""
        det = self.config.ratio
        n = run.values.size - k0
        if det.window > HISTORY_WINDOW:
            return np.ones(n, dtype=bool)
        after = self.checks.fresh_after()
        lo = run.head + k0
        s, v = run.ext_steps[: lo + n], run.ext_values[: lo + n]
        start = max(0, lo - det.window + 1)
        s, v = s[start:], v[start:]
        if not bool(np.all(np.isfinite(v))) or (after is not None and bool(np.any(s <= after))):
            return np.ones(n, dtype=bool)  # holes or a cut inside: the check sees every point
        quiet = det.quiet_many(v, from_start=start == 0)[lo - start :]
        return np.asarray(~quiet)

    def explosion_window(self, run: TagRun, k: int) -> np.ndarray:
        """The values the full explosion check reads at chunk point ``k``."""
        e = self.config.explosion
        return run.window(k, e.window + e.confirm)[1]
