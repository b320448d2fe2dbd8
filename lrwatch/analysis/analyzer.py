"""Replay a run through history -> detectors -> policy: `lrwatch analyze` and the daemon's engine.

:class:`RunAnalyzer` is fed scalars in any batch size (a whole run at once, or what one poll
found) and evaluates, step by step, the detectors whose input tag got a new point, exactly as if
it had watched the run live. It has no side effects: the daemon decides what to do with the
decisions it returns.

The parts: :mod:`.run_tags` (which tag plays which role), :mod:`.role_checks` (which detectors
run on a new point, reporting each condition once), :mod:`.cut_tracking` (whether the last cut
took effect) and the policy. This module joins them, step by step, and saves and restores their
state. The printed table is a view (:mod:`lrwatch.views.analysis_table`).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lrwatch import schema
from lrwatch.analysis import roles
from lrwatch.analysis.advice_guard import RAISE_LR_KINDS, raise_lr_overruled
from lrwatch.analysis.batch import BatchFeed
from lrwatch.analysis.batch import supported as batch_supported
from lrwatch.analysis.config import AnalyzerConfig
from lrwatch.analysis.cut_tracking import HELD_WHEN_UNAPPLIED, LastCut
from lrwatch.analysis.detectors.schedule import steps_to_next_cut
from lrwatch.analysis.explosion_gate import ExplosionGate
from lrwatch.analysis.history import History
from lrwatch.analysis.kept_best import KeptBest
from lrwatch.analysis.role_checks import RoleChecks
from lrwatch.analysis.run_tags import RunTags
from lrwatch.errors import LrwatchError
from lrwatch.policy.responses import plan_for
from lrwatch.schema import Analysis, Decision, Finding, Scalar, json_number

__all__ = ["NoUsableTags", "RunAnalyzer", "analyze_run"]

logger = logging.getLogger(__name__)

_TAG, _STEP = operator.itemgetter(0), operator.itemgetter(1)  # Scalar's tag and step
_SOON_FRACTION = 0.1  # a schedule cut this fraction of its period away is "about to happen"
_TAIL = 0.5  # a decaying LR at or below this fraction of its peak is in its tail


class NoUsableTags(LrwatchError):
    """A run has scalars, but none the analyzer knows how to read."""


class RunAnalyzer:
    """Findings and decisions for one run, fed its scalars in step order.

    Example::

        analyzer = RunAnalyzer(load_config())
        for decision in analyzer.feed(read_run(Path("runs/a"))):
            print(decision.step, decision.action.value, decision.reason)
    """

    def __init__(self, config: AnalyzerConfig | None = None, *, batch: bool = True) -> None:
        self.config = config or AnalyzerConfig()
        self.history = History()
        self.policy = self.config.new_policy()
        self.decisions: list[Decision] = []
        self._tags = RunTags()
        self._checks = RoleChecks(
            self.config, self.history, self._tags, fresh_after=self._fresh_after
        )
        self.plateau = self._checks.plateau
        # batch=False keeps the point-by-point path: the reference the batch path is tested on
        self._batch = (
            BatchFeed(
                self._checks,
                self._tags,
                self.history,
                step=self._step,
                fresh_if=self._fresh_after_if,
                cut=lambda: self._cut is not None,
            )
            if batch and batch_supported(self.config)
            else None
        )
        self._cut: LastCut | None = None
        # why each warning or critical finding led to no decision, by (kind, tag, step)
        self.why_quiet: dict[tuple[str, str, int], str] = {}
        self._held: list[Scalar] = []  # read, but their step may still be incomplete
        self._rows_upto = -1  # the newest step of a per-step lrwatch/lr row
        self._kept = KeptBest()  # the hook's best-weights copies, for a stop to restore

    # ---------------------------------------------------------------- public surface
    @property
    def findings(self) -> list[Finding]:
        """Every condition reported so far, once each (again when it worsened)."""
        return self._checks.findings

    @property
    def metric(self) -> str | None:
        """The monitored metric: the configured one, else validation loss, else the loss."""
        return self._tags.metric(self.config.metric)

    @property
    def advice_only(self) -> bool:
        """True for a run not written by lrwatch's hook: nothing in it can apply an action."""
        return not roles.is_lrwatch_run(self._tags.tags)

    @property
    def tags(self) -> frozenset[str]:
        """Every tag the run has shown so far."""
        return frozenset(self._tags.tags)

    @property
    def usable(self) -> bool:
        """Whether any tag the detectors read has been seen."""
        return bool(self._tags.roles)

    def feed(
        self, scalars: Iterable[Scalar], *, live: bool = False, hooked: bool = False
    ) -> list[Decision]:
        """Take new scalars (any order within the batch); returns the decisions they led to.

        With ``live=True`` (a run still being written, as the daemon reads it) a step is
        judged only once all of it is in (:meth:`_complete`), so the decisions do not depend
        on where reads happened to stop; a later call without it judges what is held too.
        ``hooked``: the run has lrwatch's own event file, so its per-step rows will come.
        Tags are learned in step order, so a replay sees the run exactly as a live watcher
        did: the monitored metric is the training loss until a validation loss first appears.
        """
        batch = [*self._held, *scalars]
        ready, self._held = self._complete(batch, hooked=hooked) if live else (batch, [])
        tags = set(map(_TAG, ready))
        if schema.KEPT_BEST in tags:
            self._kept.note(ready)
        self._tags.tags |= tags
        keep = {t for t in tags if self._tags.is_useful(t, metric=self.config.metric)}
        mine = [s for s in ready if s.tag in keep]
        mine.sort(key=_STEP)
        out: list[Decision] = []
        if self._batch is not None:
            out = self._batch.feed(mine)
        else:
            for step, group in itertools.groupby(mine, key=_STEP):
                out.extend(self._step(step, list(group)))
        self.decisions.extend(out)
        return out

    def _complete(self, batch: list[Scalar], *, hooked: bool) -> tuple[list[Scalar], list[Scalar]]:
        """Split ``batch`` into the steps known complete and the rest, held for the next feed.

        The hook writes a step's rows in batches, values passed to ``mon.log`` at once, so
        ``val/loss`` at step 901 can precede the loss at step 900 in the file. Its per-step
        ``lrwatch/lr`` row comes last in each batch, after the logging step's events: every
        step before the newest such row is complete (nothing is, in a hooked run whose first
        rows are not in yet), and every step up to ``lrwatch_control/closed``, which the hook writes
        last when it closes. A run without those rows (not lrwatch's) holds its newest step.
        """
        rows = [s.step for s in batch if s.tag == schema.LR]
        rows += [s.step + 1 for s in batch if s.tag == schema.CLOSED]  # closed: all of it is in
        if rows:
            self._rows_upto = max(self._rows_upto, *rows)
        limit = self._rows_upto
        if limit < 0 and not hooked:
            limit = max((s.step for s in batch), default=-1)
        return [s for s in batch if s.step < limit], [s for s in batch if s.step >= limit]

    # ---------------------------------------------------------------- one step
    def _step(self, step: int, points: list[Scalar]) -> list[Decision]:
        """The point-by-point path: one step's points into the history, then its checks."""
        self._tags.learn((p.tag for p in points), metric=self.config.metric)
        self.history.extend(points)
        return self._at_step(step, points)

    def _at_step(self, step: int, points: list[Scalar]) -> list[Decision]:
        touched = self._tags.touch(points)
        found = [f for role, point in touched.items() for f in self._checks.check(role, point)]
        if "loss_scale" in touched or "skipped" in touched:
            amp = self._checks.amp()  # one check for both series of GradScaler
            found.extend([amp] if amp is not None else [])
        # The policy hears every metric check, quiet ones too: that is how it learns that a
        # worsening validation loss stopped worsening. Quiet loss steps are not checks of it.
        if not found and "metric" not in touched:
            return []
        return self._decide(step, found)

    def _decide(self, step: int, found: list[Finding]) -> list[Decision]:
        found = self._without_overruled_advice(found)
        point = self._last_lr()
        lr = None if point is None else point.value
        if self._cut_unapplied():
            held = [f for f in found if self._cut_answers(f)]
            for f in held:
                if f.severity is not schema.Severity.INFO:
                    why = "the last cut was never applied, so no further cut is made"
                    self.why_quiet[(f.kind.value, f.tag, f.step)] = why
            found = [f for f in found if not any(f is h for h in held)]
        out = self.policy.decide(
            step,
            found,
            lr=lr,
            warmup=self._holds_back(),
            grad_norms=self._tags.window(self.history, "grad_norm", 512),
            defer=self._schedule_will(step),
            rising=self._phase() == "warmup",
        )
        for f, why in self.policy.unanswered:
            self.why_quiet[(f.kind.value, f.tag, f.step)] = why
        out = [self._kept.on_stop(d, self.metric) for d in out]
        for d in out:
            if d.action is schema.ActionKind.LR_CUT and d.factor is not None:
                known_lr = lr if lr is not None and math.isfinite(lr) else None
                self._cut = LastCut(step, known_lr, d.factor)
        return out

    def _without_overruled_advice(self, found: list[Finding]) -> list[Finding]:
        """``found`` less its raise-LR findings when the run overrules that advice (the reason
        goes to ``why_quiet``)."""
        advice = [f for f in found if f.kind in RAISE_LR_KINDS]
        if not advice:
            return found
        why = raise_lr_overruled(
            self.history,
            self._tags,
            metric=self.metric,
            patience=self.plateau.patience,
            ratio=self.config.ratio,
        )
        if why is None:
            return found
        for f in advice:
            self.why_quiet[(f.kind.value, f.tag, f.step)] = f"no raise-LR advice: {why}"
        return [f for f in found if f.kind not in RAISE_LR_KINDS]

    def _cut_answers(self, f: Finding) -> bool:
        """Whether an unapplied cut answers ``f`` already: it asks for no deeper cut than that
        one. A plateau's unapplied halving must not silence an explosion's cut by 10."""
        if f.kind not in HELD_WHEN_UNAPPLIED:
            return False
        plan = plan_for(f, warmup=False)
        asked = None if plan is None else plan.factor
        return self._cut is None or asked is None or asked <= self._cut.factor

    def _last_lr(self) -> Scalar | None:
        tag = self._tags.roles.get("lr")
        return None if tag is None else self.history.last(tag)

    def _cut_unapplied(self) -> bool:
        """Whether the run's own data shows that the last cut never took effect."""
        if self._cut is None:
            return False
        ack = self.history.last(schema.LR_FACTOR)
        return self._cut.unapplied(advice_only=self.advice_only, ack=ack, lr=self._last_lr())

    def _fresh_after(self) -> int | None:
        """The step after which points may judge the LR: the last cut's, once applied."""
        if self._cut is None or self._cut_unapplied():
            return None
        return self._cut.step

    def _fresh_after_if(self, ack: Scalar | None, lr: Scalar | None) -> int | None:
        """:meth:`_fresh_after` once ``ack`` and ``lr`` are the last acknowledgement and LR
        points (the batch path asks it for points it adds in bulk); None without a cut."""
        if self._cut is None:
            return None
        unapplied = self._cut.unapplied(advice_only=self.advice_only, ack=ack, lr=lr)
        return None if unapplied else self._cut.step

    def _schedule_will(self, step: int) -> str | None:
        """Why a gentle cut (plateau, high ratio, oscillation) is the schedule's job now, or
        None: its next step cut is near, or the LR is deep in a decaying tail."""
        tag = self._tags.roles.get("lr")
        if tag is None:
            return None
        steps, values = self.history.downsampled(tag)
        ours, _ = self.history.window(schema.LR_FACTOR)
        nxt = steps_to_next_cut(steps, values, ignore=ours, min_cut=self.config.schedule.min_cut)
        if nxt is not None and nxt[0] <= max(_SOON_FRACTION * nxt[1], 1):
            return f"the schedule cuts the LR itself in ~{nxt[0]} steps (every {nxt[1]})"
        best = self.history.best(tag, "max")
        last = self.history.last(tag)
        if best is None or last is None or not math.isfinite(last.value) or best[1] <= 0:
            return None
        factor = self._our_divisor()
        frac = last.value * max(factor, 1.0) / best[1]  # the schedule's own LR vs its peak
        if frac <= _TAIL and self._phase() != "warmup":
            return f"the schedule has lowered the LR to {frac:.0%} of its peak"
        return None

    def _our_divisor(self) -> float:
        """lrwatch's own cumulative LR divisor in force: the hook's ``lr_factor`` when logged,
        else the policy's, once the run shows that its last cut took effect."""
        applied = self.history.last(schema.LR_FACTOR)
        if applied is not None and math.isfinite(applied.value) and applied.value > 0:
            return applied.value
        if self._cut is not None and not self._cut_unapplied():
            return self.policy.total_cut
        return 1.0

    def _phase(self) -> str:
        lr = self._tags.window(self.history, "lr", self.config.schedule.window)
        if lr is None:
            return "unknown"
        return self.config.schedule.check(*lr, tag=self._tags.roles["lr"]).phase

    def _holds_back(self) -> bool:
        """Whether the LR schedule is itself moving (warm-up, a recent cut, a decay): the
        policy then leaves plateau cuts and raise-the-LR advice to the schedule."""
        lr = self._tags.window(self.history, "lr", self.config.schedule.window)
        if lr is None:
            return False
        phase = self.config.schedule.check(*lr, tag=self._tags.roles["lr"])
        return phase.phase in ("warmup", "cut", "decaying")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue where this analyzer stopped (strict-JSON safe)."""
        return {
            "history": self.history.state_dict(),
            "plateau": self.plateau.state_dict(),
            "policy": self.policy.state_dict(),
            "tags": sorted(self._tags.tags),
            "known": sorted(self._tags.known),
            "counts": dict(self._tags.counts),
            "active": self._checks.conditions.state(),
            "gates": {tag: g.state() for tag, g in self._checks.gates.items()},
            "cut": None if self._cut is None else self._cut.state(),
            "held": [[p.tag, p.step, p.wall_time, json_number(p.value)] for p in self._held],
            "rows_upto": self._rows_upto,
            "kept_best": self._kept.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        self.plateau.load_state_dict(state["plateau"])
        self.policy.load_state_dict(state["policy"])
        self._tags.reset(
            tags=state["tags"],
            known=state["known"],
            counts={str(k): int(v) for k, v in state["counts"].items()},
            metric=self.config.metric,
        )
        self._checks.conditions.load_state(state["active"])
        self._checks.gates = {tag: ExplosionGate.from_state(g) for tag, g in state["gates"].items()}
        # "cut" is absent from states saved before it existed
        self._cut = LastCut.from_state(state.get("cut"))
        # "held" and "rows_upto" are absent from states saved before read-boundary holding
        self._held = [
            Scalar(str(t), int(s), float(w), float(v)) for t, s, w, v in state.get("held", [])
        ]
        self._rows_upto = int(state.get("rows_upto", -1))
        self._kept.load_state(state.get("kept_best"))


def _tag_hint(wanted: str, tags: Iterable[str]) -> str:
    """A "did you mean" for a mistyped tag, then the run's tags, run-level before per-layer."""
    import difflib

    per_layer = tuple(f"{prefix}/" for prefix in schema.PER_TENSOR_PREFIXES.values())
    book = schema.PREFIX + "_control/"  # bookkeeping, never a metric: listed last
    names = sorted(
        set(tags), key=lambda t: (t.startswith(book), t.startswith(per_layer), t.count("/"), t)
    )
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return f"{guess}it has {listed}"


def analyze_run(run_dir: Path, config: AnalyzerConfig | None = None) -> Analysis:
    """Replay a whole run; raises RunGone / NoUsableTags / LrwatchError with a one-line reason."""
    from lrwatch.events.reader import read_run

    run_dir = Path(run_dir)
    scalars = read_run(run_dir)
    if not scalars:
        raise LrwatchError(f"{run_dir} holds no scalars (no event files, or empty ones)")
    analyzer = RunAnalyzer(config)
    analyzer.feed(scalars)
    wanted = analyzer.config.metric
    if wanted is not None and wanted not in analyzer.tags:
        raise NoUsableTags(
            f"{run_dir} has no tag {wanted!r} to monitor; {_tag_hint(wanted, analyzer.tags)}"
        )
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
