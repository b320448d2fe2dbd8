"""Which detectors run when a tag gets a new point, and with which windows.

The gating per role (:mod:`.analyzer` owns the run as a whole: tags, cuts, the policy). Cost is
bounded per point: every detector reads a bounded window, the explosion check sits behind a
cheap gate, and the rank-based loss detectors that need many points anyway (oscillation, the
plateau trend) run every few points only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from lrwatch import schema
from lrwatch.analysis.conditions import Conditions
from lrwatch.analysis.config import AnalyzerConfig
from lrwatch.analysis.explosion_gate import ExplosionGate
from lrwatch.analysis.history import History
from lrwatch.analysis.roles import Role
from lrwatch.analysis.run_tags import RunTags
from lrwatch.schema import Finding, Kind, Scalar, Severity

# The rank-based loss detectors (oscillation, plateau trend) rank a whole window per check
# (~0.1-0.3 ms each), so they run every half of the oscillation's jitter window (its verdict
# is about those points) or every quarter of the trend window: a condition is still seen well
# within one window of arising, at a small fraction of the cost of checking every step.
_OSCILLATION_STRIDE = 2  # checks per oscillation jitter window
_TREND_STRIDE = 4  # checks per plateau-trend window

Window = tuple[np.ndarray, np.ndarray]
_START_POINTS = 10  # a loss's own scale: its median over the run's first points
# A rollback goes back to the last loss at most this multiple of where the run began: what the
# zoo's healthy runs never exceeded (1.24x, lrwatch/analysis/detectors/divergence.py).
_GOOD_LEVEL = 1.5


class RoleChecks:
    """The detectors of one run, run per role; new findings are appended to ``findings``.

    ``fresh_after`` gives the step after which points may judge the LR (the step of the last
    applied cut), or None for all points: the LR-judging detectors read only those.
    """

    def __init__(
        self,
        config: AnalyzerConfig,
        history: History,
        tags: RunTags,
        *,
        fresh_after: Callable[[], int | None],
    ) -> None:
        self.config, self.history, self.tags = config, history, tags
        self.plateau = config.new_plateau()
        self.findings: list[Finding] = []
        self.conditions = Conditions()
        self.gates: dict[str, ExplosionGate] = {}
        self._openings: dict[str, np.ndarray] = {}  # each loss tag's first points, once in
        self._levels: dict[str, float] = {}  # their median
        self._fresh_after = fresh_after

    def check(self, role: Role, point: Scalar) -> list[Finding]:
        """Run the detectors that read ``role``'s tag, now that it has a new point.

        Its batch twin, which must change with it, is :class:`.role_screens.RoleScreens`.
        """
        c, tag = self.config, point.tag
        n = self.tags.counts[tag]
        out: list[Finding | None] = []
        if role in ("loss", "grad_norm", "nonfinite", "weight_norm"):
            out.append(self._nonfinite(tag, point.value, role=role))
        if role in ("loss", "grad_norm"):
            out.append(self._explosion(tag, point.value, loss=role == "loss"))
        if role == "loss":
            out.append(self._divergence(tag, point.value))
        if role == "loss" and on_ladder(n, self.config.slow_progress.min_points):
            out.append(self._slow_progress(tag))
        if role == "loss" and n % max(c.oscillation.jitter_window // _OSCILLATION_STRIDE, 1) == 0:
            ratio = self._window_of("update_ratio", c.oscillation.window)
            f = c.oscillation.check(
                *self._fresh(tag, c.oscillation.window),
                tag=tag,
                ratio=ratio,
                scale=self._init_level(tag),
            )
            out.append(self._note(Kind.OSCILLATION, tag, f))
        trend_every = max(c.plateau_trend.window // _TREND_STRIDE, 1)
        if role == "loss" and self.tags.metric(c.metric) == tag and n % trend_every == 0:
            f = c.plateau_trend.check(*self._fresh(tag, c.plateau_trend.window), tag=tag)
            out.append(self._note(Kind.PLATEAU, tag, f))
        if role == "metric" and tag != self.tags.roles.get("loss"):
            out.extend(self._metric_checks(point))
        if role == "update_ratio":
            out.append(self._ratio(tag))
        return [f for f in out if f is not None]

    def amp(self) -> Finding | None:
        """GradScaler's health, once for both of its series (loss scale, skipped steps)."""
        scale = self._window_of("loss_scale", 512)
        skipped = self._window_of("skipped", 512)
        loss = self._window_of("loss", 8)
        tag = self.tags.roles.get("loss_scale", schema.LOSS_SCALE)
        f = self.config.amp.check(scale=scale, skipped=skipped, loss=loss, tag=tag)
        if f is not None and f.evidence.get("amp") == "nonfinite_loss":
            if self.conditions.ongoing(Kind.NONFINITE, self.tags.roles.get("loss")):
                f = None  # the non-finite detector already reported this loss, at this step
        # Its findings are non-finite or explosion kinds; one AMP condition at a time per tag.
        for kind in (Kind.NONFINITE, Kind.EXPLOSION):
            if f is None or f.kind is not kind:
                self.conditions.end(kind, tag)
        return None if f is None else self._note(f.kind, tag, f)

    def _metric_checks(self, point: Scalar) -> list[Finding | None]:
        tag = point.tag
        # The tracker fires once per plateau and resets, so its findings are all new ones.
        f = self.plateau.update(point.step, point.value, tag=tag)
        if f is not None:
            self.conditions.end(Kind.PLATEAU, tag)
        out = [self._note(Kind.PLATEAU, tag, f) if f is not None else None]
        loss = self._window_of("loss", 4096)
        if loss is not None:  # overfitting is a relation between validation and training
            f = self.config.overfit.check(*self.history.window(tag), tag=tag, train=loss)
            out.append(self._note(Kind.OVERFIT, tag, f))
        return out

    def _ratio(self, tag: str) -> Finding | None:
        window = self._fresh(tag, 512)
        f = self.config.ratio.check(*window, tag=tag)
        warning = f is not None and f.kind is Kind.RATIO_HIGH and f.severity is Severity.WARNING
        if warning or (f is None and self.config.ratio.early(*window)):
            # Only then does the loss matter (a clear fall makes it info): read it only then.
            loss = self._window_of("loss", 4096)
            f = self.config.ratio.check(*window, tag=tag, loss=loss)
        for kind in (Kind.RATIO_HIGH, Kind.RATIO_LOW):
            if f is None or kind != f.kind:
                self.conditions.end(kind, tag)
        return None if f is None else self._note(f.kind, tag, f)

    def _explosion(self, tag: str, value: float, *, loss: bool) -> Finding | None:
        """The explosion check, behind a gate that lets through only points that could fire.

        A loss is judged against its own scale (its level over the run's first points), so
        minibatch noise on a near-zero loss is never an explosion; a gradient norm is not.
        """
        e = self.config.explosion
        gate = self.gates.setdefault(tag, ExplosionGate())
        ongoing = self.conditions.ongoing(Kind.EXPLOSION, tag)
        if not (gate.admits(value, runaway_rises=e.growth_points - 1) or ongoing):
            return None
        steps, values = self.history.window(tag, e.window + e.confirm)
        gate.rebase(values, e)
        scale = self._start_level(tag) if loss else None
        return self._note(Kind.EXPLOSION, tag, e.check(steps, values, tag=tag, scale=scale))

    def _divergence(self, tag: str, value: float) -> Finding | None:
        """The divergence check, run only for a point far above the loss's first level (or
        while a divergence is ongoing, so that its end is seen)."""
        d = self.config.divergence
        scale = self._first_level(tag)
        if not (d.could_fire(value, scale) or self.conditions.ongoing(Kind.DIVERGENCE, tag)):
            return self._note(Kind.DIVERGENCE, tag, None)
        f = d.check(*self.history.window(tag, d.points + 16), tag=tag, scale=scale)
        if f is not None and scale is not None:
            good = self._last_good(tag, below=_GOOD_LEVEL * scale, before=f.evidence["first_step"])
            f = dataclasses.replace(f, evidence={**f.evidence, "last_good": good})
        return self._note(Kind.DIVERGENCE, tag, f)

    def _slow_progress(self, tag: str) -> Finding | None:
        """The loss's whole-run shape, with the step at which the LR peaked (a warm-up's end)."""
        peak = None
        lr_tag = self.tags.roles.get("lr")
        if lr_tag is not None:
            lr_steps, lr = self.history.downsampled(lr_tag)
            ok = np.isfinite(lr)
            if ok.any():
                peak = int(lr_steps[np.argmax(np.where(ok, lr, -np.inf) >= 0.99 * lr[ok].max())])
        steps, values = self.history.downsampled(tag)
        f = self.config.slow_progress.check(steps, values, tag=tag, peak_step=peak)
        return self._note(Kind.SLOW_PROGRESS, tag, f)

    def _last_good(self, tag: str, *, below: float, before: int) -> int:
        """The last step before ``before`` whose loss was finite and at most ``below``: where a
        rollback should go. The run's first logged step when none in the window is."""
        steps, values = self.history.window(tag, 4096)
        ok = (steps < before) & np.isfinite(values) & (values <= below)
        if ok.any():
            return int(steps[ok][-1])
        return int(steps[0]) if steps.size else 0

    def _opening(self, tag: str) -> np.ndarray:
        """The first ``_START_POINTS`` finite points of the run's thinned history; kept once
        all of them are in (a run's opening never changes)."""
        kept = self._openings.get(tag)
        if kept is not None:
            return kept
        _, thinned = self.history.downsampled(tag)
        values: np.ndarray = np.asarray(thinned[np.isfinite(thinned)][:_START_POINTS])
        if values.size == _START_POINTS:
            self._openings[tag] = values
        return values

    def _start_level(self, tag: str) -> float | None:
        """A loss's own scale: the median of its opening points (kept once they are all in:
        it was a median per loss point, a quarter of a daemon's work per step)."""
        level = self._levels.get(tag)
        if level is not None:
            return level
        values = self._opening(tag)
        level = float(np.median(values)) if values.size else None
        if level is not None and tag in self._openings:
            self._levels[tag] = level
        return level

    def _init_level(self, tag: str) -> float | None:
        """The loss at initialisation: the run's first finite point."""
        values = self._opening(tag)
        return float(values[0]) if values.size else None

    def _first_level(self, tag: str) -> float | None:
        """Where a loss began: its start level, or its first point when the start level is
        already ``ratio`` times that (a run at 100x its LR diverges within its first ten
        points, so their median is no start)."""
        level, first = self._start_level(tag), self._init_level(tag)
        if level is None or first is None:
            return None
        return first if first > 0 and level >= self.config.divergence.ratio * first else level

    def _nonfinite(self, tag: str, value: float, *, role: Role) -> Finding | None:
        """Non-finite values; a loss or weight-norm finding also carries its ``role`` and the
        ``last_good`` step (the policy stops on non-finite weights or a loss that stays so)."""
        bad = not math.isfinite(value) or (tag == schema.NONFINITE and value > 0.5)
        if not bad:
            self.conditions.end(Kind.NONFINITE, tag)
            return None
        skipped = self._window_of("skipped", 64)
        steps, values = self.history.window(tag, 256)
        f = self.config.nonfinite.check(steps, values, tag=tag, skipped=skipped)
        if f is not None and role in ("loss", "weight_norm"):
            good = steps[np.isfinite(values)]
            last_good = int(good[-1]) if good.size else None
            f = dataclasses.replace(
                f, evidence={**f.evidence, "role": role, "last_good": last_good}
            )
        return self._note(Kind.NONFINITE, tag, f)

    def _note(self, kind: Kind, tag: str, f: Finding | None) -> Finding | None:
        """Record ``f`` unless it continues a condition already reported; pass it on either way."""
        if self.conditions.report(kind, tag, f) and f is not None:
            self.findings.append(f)
        return f

    # Read by the batch twin of check (role_screens), which must see the same scale and windows.
    def opening_known(self, tag: str) -> bool:
        """Whether ``tag``'s opening points are all in: its start level is settled."""
        return tag in self._openings

    def first_level(self, tag: str) -> float | None:
        return self._first_level(tag)

    def fresh_after(self) -> int | None:
        return self._fresh_after()

    def _window_of(self, role: Role, n: int) -> Window | None:
        return self.tags.window(self.history, role, n)

    def _fresh(self, tag: str, n: int) -> Window:
        """The window of an LR-judging detector: only points logged after an applied cut."""
        steps, values = self.history.window(tag, n)
        after = self._fresh_after()
        if after is not None:
            keep = steps > after
            steps, values = steps[keep], values[keep]
        return steps, values


def on_ladder(n: int, start: int) -> bool:
    """Whether the ``n``-th point is one at which a whole-run check runs: every 10 points from
    ``start`` up to 200, then at most every 10% of the points seen (its cost grows with the run,
    its verdict changes slowly)."""
    if n < start:
        return False
    every = 10 if n < 200 else 10 * 2 ** int(math.log2(n / 100))
    return n % every == 0
