"""Replay a run through history -> detectors -> policy: `lrwatch analyze` and the daemon's engine.

:class:`RunAnalyzer` is fed scalars in any batch size (a whole run at once, or what one poll
found) and evaluates, step by step, the detectors whose input tag got a new point, exactly as if
it had watched the run live. It has no side effects: the daemon decides what to do with the
decisions it returns.

Cost is bounded per point: every detector reads a bounded window, and the rank-based ones that
need many points anyway (oscillation, the loss plateau trend) run every few points only.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrwatch import roles, schema
from lrwatch.config import AnalyzerConfig
from lrwatch.errors import LrwatchError
from lrwatch.history import History
from lrwatch.roles import Role
from lrwatch.schema import Analysis, Decision, Finding, Kind, Scalar, Severity

logger = logging.getLogger(__name__)

_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
# The rank-based loss detectors (oscillation, plateau trend) rank a whole window per check
# (~0.1-0.3 ms each), so they run every half of the oscillation's jitter window (its verdict
# is about those points) or every quarter of the trend window: a condition is still seen well
# within one window of arising, at a small fraction of the cost of checking every step.
_OSCILLATION_STRIDE = 2  # checks per oscillation jitter window
_TREND_STRIDE = 4  # checks per plateau-trend window
_REBASE_EVERY = 16  # points between two refreshes of an explosion gate's baseline
_STEP = operator.attrgetter("step")
# Conditions that say "this LR is wrong": judged anew on points logged after a cut. While the
# logged LR shows that the last cut was never applied (a replay, or a daemon giving advice
# only), they and new explosion episodes lead to no further cut: the data still shows the old
# LR, so it is no evidence about the new one, and cutting again every cooldown would only burn
# the budget (the cut already decided is the answer to them). Non-finite values still count:
# they persisting after cuts is what stops a run, and overfitting is not about the LR.
_LR_KINDS = frozenset({Kind.RATIO_HIGH, Kind.OSCILLATION, Kind.PLATEAU})
_HELD_WHEN_UNAPPLIED = _LR_KINDS | {Kind.EXPLOSION}


class NoUsableTags(LrwatchError):
    """A run has scalars, but none the analyzer knows how to read."""


@dataclass
class _Condition:
    """An ongoing condition (kind, tag): reported once, again only when it worsens."""

    severity: Severity
    since: int


@dataclass
class _Seen:
    """Per-run bookkeeping that is not history: which tag plays which role, point counts."""

    tags: set[str] = field(default_factory=set)  # every tag of the run
    known: set[str] = field(default_factory=set)  # tags that can play a role, seen so far
    roles: dict[Role, str] = field(default_factory=dict)
    by_tag: dict[str, list[Role]] = field(default_factory=dict)
    useful: dict[str, bool] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Gate:
    """A necessary condition for an explosion finding, so the full check runs on few points.

    The detector fires only on a point at least ``min_ratio`` times its baseline median, or on
    ``growth_points`` strictly rising points. The gate keeps that median from the last full
    check (refreshed every ``_REBASE_EVERY`` points) and lets a point through when it is above
    half that margin, or ends a run of rises. On a run that is only getting better, checking
    the loss costs two comparisons per step instead of a median of a window.
    """

    bar: float = -math.inf
    prev: float = math.nan
    rises: int = 0
    since: int = 0

    def admits(self, value: float, *, runaway_rises: int) -> bool:
        self.rises = self.rises + 1 if value > self.prev else 0
        self.prev, self.since = value, self.since + 1
        return value >= self.bar or self.rises >= runaway_rises or self.since >= _REBASE_EVERY

    def rebase(self, values: Any, detector: Any) -> None:
        self.since = 0
        base = values[np.isfinite(values)][: -detector.confirm][-detector.window :]
        if base.size < detector.min_history:
            self.bar = -math.inf
            return
        med = float(np.median(base))
        self.bar = med + 0.5 * (detector.min_ratio - 1.0) * abs(med)

    def state(self) -> list[float | int | str]:
        return [_out(self.bar), _out(self.prev), self.rises, self.since]


@dataclass
class _Cut:
    """The last LR cut this analyzer decided: when, at which logged LR, by how much."""

    step: int
    lr: float | None
    factor: int

    def state(self) -> list[Any]:
        return [self.step, None if self.lr is None else _out(self.lr), self.factor]


def _out(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


class RunAnalyzer:
    """Findings and decisions for one run, fed its scalars in step order.

    Example::

        analyzer = RunAnalyzer(load_config())
        for decision in analyzer.feed(read_run(Path("runs/a"))):
            print(decision.step, decision.action.value, decision.reason)
    """

    def __init__(self, config: AnalyzerConfig | None = None) -> None:
        self.config = config or AnalyzerConfig()
        self.history = History()
        self.plateau = self.config.new_plateau()
        self.policy = self.config.new_policy()
        self.findings: list[Finding] = []
        self.decisions: list[Decision] = []
        self._seen = _Seen()
        self._active: dict[tuple[Kind, str], _Condition] = {}
        self._gates: dict[str, _Gate] = {}
        self._cut: _Cut | None = None

    # ---------------------------------------------------------------- public surface
    @property
    def metric(self) -> str | None:
        """The monitored metric: the configured one, else validation loss, else the loss."""
        r = self._seen.roles
        return self.config.metric or r.get("metric") or r.get("loss")

    @property
    def advice_only(self) -> bool:
        """True for a run not written by lrwatch's hook: nothing in it can apply an action."""
        return not roles.is_lrwatch_run(self._seen.tags)

    @property
    def tags(self) -> frozenset[str]:
        """Every tag the run has shown so far."""
        return frozenset(self._seen.tags)

    @property
    def usable(self) -> bool:
        """Whether any tag the detectors read has been seen."""
        return bool(self._seen.roles)

    def feed(self, scalars: Iterable[Scalar]) -> list[Decision]:
        """Take new scalars (any order within the batch); returns the decisions they led to.

        Tags are learned in step order, so a replay sees the run exactly as a live watcher
        did: the monitored metric is the training loss until a validation loss first appears.
        """
        batch = list(scalars)
        tags = {s.tag for s in batch}
        self._seen.tags |= tags
        keep = {t for t in tags if self._useful(t)}
        mine = sorted((s for s in batch if s.tag in keep), key=_STEP)
        out: list[Decision] = []
        for step, group in itertools.groupby(mine, key=_STEP):
            points = list(group)
            self._learn_tags(p.tag for p in points)
            self.history.extend(points)
            out.extend(self._at_step(step, points))
        self.decisions.extend(out)
        return out

    # ---------------------------------------------------------------- one step
    def _useful(self, tag: str) -> bool:
        """Whether ``tag`` can play a role at all (per-layer tags, for instance, cannot)."""
        hit = self._seen.useful.get(tag)
        if hit is None:
            hit = self._seen.useful[tag] = (
                tag in (self.config.metric, schema.LR_FACTOR) or roles.role_of(tag) is not None
            )
        return hit

    def _learn_tags(self, tags: Iterable[str]) -> None:
        seen = self._seen
        new = set(tags) - seen.known
        if new:
            seen.known |= new
            seen.roles = roles.assign(seen.known, metric=self.config.metric)
            seen.by_tag = {}
            for role, tag in seen.roles.items():
                seen.by_tag.setdefault(tag, []).append(role)

    def _at_step(self, step: int, points: list[Scalar]) -> list[Decision]:
        by_tag, counts = self._seen.by_tag, self._seen.counts
        touched: dict[Role, Scalar] = {}
        for p in points:
            for role in by_tag.get(p.tag, ()):
                touched[role] = p
            counts[p.tag] = counts.get(p.tag, 0) + 1
        found: list[Finding] = []
        for role, point in touched.items():
            found.extend(self._check(role, point))
        if "loss_scale" in touched or "skipped" in touched:
            amp = self._amp()  # one check for both series of GradScaler
            found.extend([amp] if amp is not None else [])
        # The policy hears every metric check, quiet ones too: that is how it learns that a
        # worsening validation loss stopped worsening. Quiet loss steps are not checks of it.
        if not found and "metric" not in touched:
            return []
        return self._decide(step, found)

    def _check(self, role: Role, point: Scalar) -> list[Finding]:
        """Run the detectors that read ``role``'s tag, now that it has a new point."""
        c, tag = self.config, point.tag
        n = self._seen.counts[tag]
        out: list[Finding | None] = []
        if role in ("loss", "grad_norm", "nonfinite"):
            out.append(self._nonfinite(tag, point.value))
        if role in ("loss", "grad_norm"):
            out.append(self._explosion(tag, point.value))
        if role == "loss" and n % max(c.oscillation.jitter_window // _OSCILLATION_STRIDE, 1) == 0:
            ratio = self._window_of("update_ratio", c.oscillation.window)
            f = c.oscillation.check(*self._fresh(tag, c.oscillation.window), tag=tag, ratio=ratio)
            out.append(self._note(Kind.OSCILLATION, tag, f))
        trend_every = max(c.plateau_trend.window // _TREND_STRIDE, 1)
        if role == "loss" and self.metric == tag and n % trend_every == 0:
            f = c.plateau_trend.check(*self._fresh(tag, c.plateau_trend.window), tag=tag)
            out.append(self._note(Kind.PLATEAU, tag, f))
        if role == "metric" and tag != self._seen.roles.get("loss"):
            out.extend(self._metric_checks(point))
        if role == "update_ratio":
            out.append(self._ratio(tag))
        return [f for f in out if f is not None]

    def _metric_checks(self, point: Scalar) -> list[Finding | None]:
        tag = point.tag
        # The tracker fires once per plateau and resets, so its findings are all new ones.
        f = self.plateau.update(point.step, point.value, tag=tag)
        if f is not None:
            self._active.pop((Kind.PLATEAU, tag), None)
        out = [self._note(Kind.PLATEAU, tag, f) if f is not None else None]
        loss = self._window_of("loss", 4096)
        if loss is not None:  # overfitting is a relation between validation and training
            f = self.config.overfit.check(*self._win(tag), tag=tag, train=loss)
            out.append(self._note(Kind.OVERFIT, tag, f))
        return out

    def _ratio(self, tag: str) -> Finding | None:
        window = self._fresh(tag, 512)
        f = self.config.ratio.check(*window, tag=tag)
        if f is not None and f.kind is Kind.RATIO_HIGH and f.severity is Severity.WARNING:
            # Only then does the loss matter (a clear fall makes it info): read it only then.
            loss = self._window_of("loss", 4096)
            f = self.config.ratio.check(*window, tag=tag, loss=loss)
        key_kind = f.kind if f is not None else None
        for kind in (Kind.RATIO_HIGH, Kind.RATIO_LOW):
            if kind != key_kind:
                self._active.pop((kind, tag), None)
        return None if f is None else self._note(f.kind, tag, f)

    def _amp(self) -> Finding | None:
        scale = self._window_of("loss_scale", 512)
        skipped = self._window_of("skipped", 512)
        loss = self._window_of("loss", 8)
        tag = self._seen.roles.get("loss_scale", schema.LOSS_SCALE)
        f = self.config.amp.check(scale=scale, skipped=skipped, loss=loss, tag=tag)
        loss_tag = self._seen.roles.get("loss")
        if f is not None and f.evidence.get("amp") == "nonfinite_loss":
            if (Kind.NONFINITE, loss_tag) in self._active:
                f = None  # the non-finite detector already reported this loss, at this step
        # Its findings are non-finite or explosion kinds; one AMP condition at a time per tag.
        for kind in (Kind.NONFINITE, Kind.EXPLOSION):
            if f is None or f.kind is not kind:
                self._active.pop((kind, tag), None)
        return None if f is None else self._note(f.kind, tag, f)

    def _explosion(self, tag: str, value: float) -> Finding | None:
        """The explosion check, behind a gate that lets through only points that could fire."""
        e = self.config.explosion
        gate = self._gates.setdefault(tag, _Gate())
        ongoing = (Kind.EXPLOSION, tag) in self._active
        if not (gate.admits(value, runaway_rises=e.growth_points - 1) or ongoing):
            return None
        steps, values = self._win(tag, e.window + e.confirm)
        gate.rebase(values, e)
        return self._note(Kind.EXPLOSION, tag, e.check(steps, values, tag=tag))

    def _nonfinite(self, tag: str, value: float) -> Finding | None:
        bad = not math.isfinite(value) or (tag == schema.NONFINITE and value > 0.5)
        if not bad:
            self._active.pop((Kind.NONFINITE, tag), None)
            return None
        skipped = self._window_of("skipped", 64)
        f = self.config.nonfinite.check(*self._win(tag, 256), tag=tag, skipped=skipped)
        return self._note(Kind.NONFINITE, tag, f)

    # ---------------------------------------------------------------- findings -> decisions
    def _note(self, kind: Kind, tag: str, f: Finding | None) -> Finding | None:
        """Record ``f`` unless it continues a condition already reported; pass it on either way.

        A check that finds nothing ends the condition, so its next occurrence is reported anew.
        """
        key = (kind, tag)
        if f is None:
            self._active.pop(key, None)
            return None
        cond = self._active.get(key)
        if cond is None or _RANK[f.severity] > _RANK[cond.severity]:
            self._active[key] = _Condition(f.severity, f.step)
            self.findings.append(f)
        return f

    def _decide(self, step: int, found: list[Finding]) -> list[Decision]:
        point = self.history.last(self._seen.roles["lr"]) if "lr" in self._seen.roles else None
        lr = None if point is None else point.value
        if self._cut_unapplied():
            found = [f for f in found if f.kind not in _HELD_WHEN_UNAPPLIED]
        out = self.policy.decide(
            step,
            found,
            lr=lr,
            warmup=self._holds_back(),
            grad_norms=self._window_of("grad_norm", 512),
        )
        for d in out:
            if d.action is schema.ActionKind.LR_CUT and d.factor is not None:
                self._cut = _Cut(
                    step, lr if lr is not None and math.isfinite(lr) else None, d.factor
                )
        return out

    def _cut_unapplied(self) -> bool:
        """Whether the run's own data shows that the last cut never took effect.

        A run no hook of lrwatch writes cannot apply anything. The hook's own acknowledgement
        (``lrwatch/lr_factor`` logged after the cut) means applied. Otherwise the logged LR must
        have fallen by at least the square root of the factor (midway, in log terms) once a
        point after the cut exists; without an LR tag, or before that point, assume applied.
        """
        cut = self._cut
        if cut is None:
            return False
        if self.advice_only:
            return True
        ack = self.history.last(schema.LR_FACTOR)
        if ack is not None and ack.step >= cut.step and ack.value > 1.0:
            return False
        last = self.history.last(self._seen.roles["lr"]) if "lr" in self._seen.roles else None
        if cut.lr is None or last is None or last.step <= cut.step:
            return False
        return last.value > cut.lr / math.sqrt(cut.factor)

    def _holds_back(self) -> bool:
        """Whether the LR schedule is itself moving (warm-up, a recent cut, a decay): the
        policy then leaves plateau cuts and raise-the-LR advice to the schedule."""
        lr = self._window_of("lr", self.config.schedule.window)
        if lr is None:
            return False
        phase = self.config.schedule.check(*lr, tag=self._seen.roles["lr"])
        return phase.phase in ("warmup", "cut", "decaying")

    # ---------------------------------------------------------------- helpers
    def _win(self, tag: str, n: int | None = None) -> tuple[Any, Any]:
        return self.history.window(tag, n)

    def _fresh(self, tag: str, n: int) -> tuple[Any, Any]:
        """The window of an LR-judging detector: only points logged after an applied cut."""
        steps, values = self._win(tag, n)
        if self._cut is not None and not self._cut_unapplied():
            keep = steps > self._cut.step
            steps, values = steps[keep], values[keep]
        return steps, values

    def _window_of(self, role: Role, n: int) -> tuple[Any, Any] | None:
        tag = self._seen.roles.get(role)
        return None if tag is None else self.history.window(tag, n)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue where this analyzer stopped (strict-JSON safe)."""
        return {
            "history": self.history.state_dict(),
            "plateau": self.plateau.state_dict(),
            "policy": self.policy.state_dict(),
            "tags": sorted(self._seen.tags),
            "known": sorted(self._seen.known),
            "counts": dict(self._seen.counts),
            "active": [
                [k.value, t, c.severity.value, c.since] for (k, t), c in self._active.items()
            ],
            "gates": {tag: g.state() for tag, g in self._gates.items()},
            "cut": None if self._cut is None else self._cut.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        self.plateau.load_state_dict(state["plateau"])
        self.policy.load_state_dict(state["policy"])
        self._seen = _Seen(
            tags=set(state["tags"]), counts={str(k): int(v) for k, v in state["counts"].items()}
        )
        self._learn_tags(state["known"])
        self._active = {
            (Kind(k), str(t)): _Condition(Severity(sev), int(since))
            for k, t, sev, since in state["active"]
        }
        self._gates = {
            tag: _Gate(float(bar), float(prev), int(rises), int(since))
            for tag, (bar, prev, rises, since) in state["gates"].items()
        }
        cut = state.get("cut")  # absent from states saved before it existed
        self._cut = (
            None
            if cut is None
            else _Cut(int(cut[0]), None if cut[1] is None else float(cut[1]), int(cut[2]))
        )


def analyze_run(run_dir: Path, config: AnalyzerConfig | None = None) -> Analysis:
    """Replay a whole run; raises RunGone / NoUsableTags / LrwatchError with a one-line reason."""
    from lrwatch.reader import read_run

    run_dir = Path(run_dir)
    scalars = read_run(run_dir)
    if not scalars:
        raise LrwatchError(f"{run_dir} holds no scalars (no event files, or empty ones)")
    analyzer = RunAnalyzer(config)
    analyzer.feed(scalars)
    wanted = analyzer.config.metric
    if wanted is not None and wanted not in analyzer.tags:
        some = ", ".join(sorted(analyzer.tags)[:8])
        raise NoUsableTags(f"{run_dir} has no tag {wanted!r} to monitor; it has {some}...")
    if not analyzer.usable:
        some = ", ".join(sorted({s.tag for s in scalars})[:5])
        raise NoUsableTags(
            f"{run_dir} has no tag lrwatch can analyse (saw {some}...); name the metric "
            "with --metric TAG"
        )
    return Analysis(
        run=str(run_dir),
        findings=tuple(analyzer.findings),
        decisions=tuple(analyzer.decisions),
        metric=analyzer.metric or "",
        extra={"advice_only": analyzer.advice_only},
    )


def format_table(analysis: Analysis) -> str:
    """The human view of an analysis: one line per finding and decision, in step order."""
    rows: list[tuple[int, int, int, str]] = []  # step, findings first, original order, line
    for i, f in enumerate(analysis.findings):
        what = f"{f.kind.value} ({f.severity.value})"
        text = f.message if f.tag in f.message else f"{f.tag}: {f.message}"
        rows.append((f.step, 0, i, f"{f.step:>8}  finding   {what:<24} {text}"))
    for i, d in enumerate(analysis.decisions):
        how = d.action.value
        if d.factor is not None:
            how += f" /{d.factor}"
        if d.max_norm is not None:
            how += f" max_norm={d.max_norm:.3g}"
        rows.append((d.step, 1, i, f"{d.step:>8}  decision  {how:<24} {d.reason}"))
    head = [f"run {analysis.run}  (metric: {analysis.metric or 'none'})"]
    if analysis.extra.get("advice_only"):
        head.append("not written by lrwatch's hook: decisions are advice only")
    if not rows:
        return "\n".join([*head, "no findings: nothing to act on"])
    head.append(f"{'step':>8}  {'what':<9} {'kind / action':<24} detail")
    tail = f"{len(analysis.findings)} finding(s), {len(analysis.decisions)} decision(s)"
    return "\n".join([*head, *(r[3] for r in sorted(rows)), tail])
