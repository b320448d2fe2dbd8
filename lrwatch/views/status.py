"""``lrwatch status``: one line per run saying how it is doing and what lrwatch did to it.

Everything comes from files a run directory already holds, so status works whether or not a
daemon is running: the event files (last step and its age, effective LR, cumulative cut, the
hook's acknowledgements), the analyzer replayed over them (findings; decisions when no daemon ran),
the daemon's audit log (the decisions it really took), the control file (actions issued, by the
daemon or a human) and the hook's applied file.

Health, first match wins:

- ``stopped``: a stop action was applied (``lrwatch_control/stop`` logged, or the applied file
  says so);
- ``ended`` / ``stale``: no new event for ``stale_after`` seconds, and the job closed its monitor
  (``lrwatch_control/closed`` at its last step: it finished) / did not (hung, killed, or a run that
  lrwatch's hook does not write);
- ``acting``: a control action was issued and the job has not acknowledged it yet;
- ``warning``: a warning or critical finding in the recent part of the run;
- ``ok``: none of the above.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lrwatch import schema
from lrwatch.analysis import roles
from lrwatch.errors import LrwatchError
from lrwatch.schema import Action, Finding, Scalar, Severity

logger = logging.getLogger(__name__)

Health = Literal["ok", "warning", "acting", "stopped", "ended", "stale"]
STALE_AFTER = 300.0  # seconds without a new event before a run counts as stale
# A finding counts as current when it lies in the last RECENT_FRACTION of the run's steps, or
# the last RECENT_MIN steps: an old, handled spike must not keep a healthy run "warning".
RECENT_FRACTION = 0.1
RECENT_MIN = 100


@dataclass
class Snapshot:
    """Everything lrwatch knows about one run, read once; shared by status and report."""

    run_dir: Path
    series: dict[str, tuple[list[int], list[float]]]  # tag -> steps, values (file order)
    last_step: int | None
    last_wall_time: float | None
    roles: dict[str, str]
    findings: list[Finding]
    decisions: list[dict[str, Any]]  # decision JSON; from the audit log when the daemon ran
    from_audit: bool
    actions: list[Action]  # control-file actions, oldest first
    acked: set[int]
    stop_applied: bool
    problems: list[str] = field(default_factory=list)


def load_snapshot(run_dir: Path, *, config: Any = None) -> Snapshot:
    """Read a run's events, audit log, control and applied files, and replay the analyzer."""
    from lrwatch.analysis.analyzer import RunAnalyzer
    from lrwatch.daemon.outputs import read_audit
    from lrwatch.events.reader import read_run

    run_dir = Path(run_dir)
    scalars = read_run(run_dir)
    analyzer = RunAnalyzer(config)
    analyzer.feed(scalars)
    audit = read_audit(run_dir)
    audit_decisions = [r for r in audit if r.get("event") == "decision"]
    decisions = audit_decisions or [d.to_json() for d in analyzer.decisions]
    series = _series(scalars)
    acked = {int(v) for v in series.get(schema.CONTROL_ACK, ([], []))[1] if math.isfinite(v)}
    acked |= {int(r["action_id"]) for r in audit if r.get("event") == "acknowledged"}
    problems: list[str] = []
    actions = _actions(run_dir, problems)
    applied = _applied(run_dir, problems)
    if applied is not None:
        acked |= set(applied.ids)
    stop_logged = any(v > 0.5 for v in series.get(schema.STOP, ([], []))[1])
    last = max(scalars, key=lambda s: (s.step, s.wall_time), default=None)
    return Snapshot(
        run_dir=run_dir,
        series=series,
        last_step=None if last is None else last.step,
        last_wall_time=max((s.wall_time for s in scalars), default=None),
        roles={str(k): v for k, v in roles.assign(series, metric=analyzer.config.metric).items()},
        findings=list(analyzer.findings),
        decisions=decisions,
        from_audit=bool(audit_decisions),
        actions=actions,
        acked=acked,
        stop_applied=stop_logged or (applied is not None and applied.stop),
        problems=problems,
    )


def _series(scalars: Sequence[Scalar]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for s in scalars:
        steps, values = out.setdefault(s.tag, ([], []))
        steps.append(s.step)
        values.append(s.value)
    return out


def _actions(run_dir: Path, problems: list[str]) -> list[Action]:
    from lrwatch.control import read_control

    path = run_dir / schema.CONTROL_FILENAME
    if not path.exists():
        return []
    try:
        return list(read_control(path).actions)
    except LrwatchError as err:
        problems.append(str(err))
        return []


def _applied(run_dir: Path, problems: list[str]) -> Any:
    from lrwatch.hook.applied import Applied

    try:
        return Applied.load(run_dir / schema.APPLIED_FILENAME)
    except (OSError, ValueError) as err:
        problems.append(f"{schema.APPLIED_FILENAME}: {err}")
        return None


@dataclass(frozen=True)
class RunStatus:
    """One line of ``lrwatch status``; :meth:`to_json` is the stable ``--json`` object."""

    run: str
    health: Health
    lr: float | None
    lr_factor: float | None
    last_finding: str | None
    last_finding_step: int | None
    last_decision: str | None
    last_decision_step: int | None
    acknowledged: bool | None  # None: the decision was advice, never written to a control file
    last_step: int | None
    age_s: float | None
    pending_actions: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["pending_actions"] = list(self.pending_actions)
        doc["problems"] = list(self.problems)
        return {
            k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in doc.items()
        }


def run_status(
    run_dir: Path, *, now: float | None = None, stale_after: float = STALE_AFTER, config: Any = None
) -> RunStatus:
    """The status of one run, as of ``now`` (default: the current time)."""
    snap = load_snapshot(run_dir, config=config)
    now = time.time() if now is None else now
    age = None if snap.last_wall_time is None else max(0.0, now - snap.last_wall_time)
    pending = tuple(a.id for a in snap.actions if a.id not in snap.acked)
    decision, decision_step, acked = _last_decision(snap)
    finding = snap.findings[-1] if snap.findings else None
    if snap.stop_applied:
        health: Health = "stopped"
    elif age is None or age > stale_after:
        health = "ended" if _closed(snap) else "stale"
    elif pending:
        health = "acting"
    elif _recent_trouble(snap.findings, snap.last_step):
        health = "warning"
    else:
        health = "ok"
    return RunStatus(
        run=str(run_dir),
        health=health,
        lr=_last(snap.series, snap.roles.get("lr")),
        lr_factor=_last(snap.series, schema.LR_FACTOR),
        last_finding=None if finding is None else _finding_text(finding),
        last_finding_step=None if finding is None else finding.step,
        last_decision=decision,
        last_decision_step=decision_step,
        acknowledged=acked,
        last_step=snap.last_step,
        age_s=age,
        pending_actions=pending,
        problems=tuple(snap.problems),
    )


def _closed(snap: Snapshot) -> bool:
    """Closed cleanly at its last step (a resumed run that logged on is open again)."""
    steps = snap.series.get(schema.CLOSED, ([], []))[0]
    return bool(steps) and snap.last_step is not None and steps[-1] >= snap.last_step


def _last(series: Mapping[str, tuple[list[int], list[float]]], tag: str | None) -> float | None:
    if tag is None or tag not in series:
        return None
    steps, values = series[tag]
    return values[max(range(len(steps)), key=steps.__getitem__)]  # the latest step wins


def _recent_trouble(findings: Sequence[Finding], last_step: int | None) -> bool:
    if last_step is None:
        return False
    since = last_step - max(RECENT_MIN, int(RECENT_FRACTION * last_step))
    return any(f.severity is not Severity.INFO and f.step >= since for f in findings)


def _finding_text(f: Finding) -> str:
    return f"{f.kind.value} ({f.severity.value}) on {f.tag}"


def _last_decision(snap: Snapshot) -> tuple[str | None, int | None, bool | None]:
    """The latest of: the daemon's (or analyzer's) decisions and the control file's actions."""
    doc = snap.decisions[-1] if snap.decisions else None
    action = snap.actions[-1] if snap.actions else None
    doc_time = float(doc.get("wall_time", 0.0)) if doc is not None else -math.inf
    if action is not None and (doc is None or action.issued_at > doc_time + 1e-3):
        if doc is None or doc.get("action_id") != action.id:
            text = f"{describe(action.to_json())} #{action.id} ({action.source})"
            return text, None, action.id in snap.acked
    if doc is None:
        return None, None, None
    action_id = doc.get("action_id")
    text = describe(doc) + (f" #{action_id}" if action_id is not None else "")
    if not snap.from_audit:
        text += " (advice)"
    return text, int(doc["step"]), None if action_id is None else int(action_id) in snap.acked


def describe(doc: Mapping[str, Any]) -> str:
    """``lr_cut /2``, ``clip max_norm=1``, ``stop``: an action or decision in a few characters."""
    what = str(doc.get("action", "?"))
    if doc.get("factor") is not None:
        what += f" /{doc['factor']}"
    if doc.get("max_norm") is not None:
        what += f" max_norm={float(doc['max_norm']):.3g}"
    if doc.get("target") is not None:
        what += f" #{doc['target']}"
    return what


def collect_status(
    logdir: Path, *, now: float | None = None, stale_after: float = STALE_AFTER, config: Any = None
) -> list[RunStatus]:
    """The status of every run under ``logdir`` (see :func:`lrwatch.events.reader.find_runs`)."""
    from lrwatch.events.reader import find_runs

    now = time.time() if now is None else now
    out = []
    for run in find_runs(Path(logdir)):
        try:
            out.append(run_status(run, now=now, stale_after=stale_after, config=config))
        except LrwatchError as err:  # a run that vanished mid-listing: skip it, keep the rest
            logger.warning("%s: %s", run, err)
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _ack(s: RunStatus) -> str:
    return {None: "-", True: "yes", False: "NO"}[s.acknowledged]


def format_status(statuses: Sequence[RunStatus], *, logdir: Path | None = None) -> str:
    """An aligned table, one run per line; run names relative to ``logdir`` when given."""
    head = ("RUN", "HEALTH", "STEP", "AGE", "LR", "CUT", "LAST FINDING", "LAST DECISION", "ACK")
    rows: list[tuple[str, ...]] = [head]
    for s in statuses:
        name = s.run
        if logdir is not None:
            rel = Path(s.run).relative_to(logdir) if Path(s.run).is_relative_to(logdir) else None
            name = str(rel) if rel is not None and str(rel) != "." else Path(s.run).name or s.run
        finding = "-" if s.last_finding is None else f"{s.last_finding} @{s.last_finding_step}"
        decision = s.last_decision or "-"
        if s.last_decision_step is not None:
            decision += f" @{s.last_decision_step}"
        cut = "-" if s.lr_factor is None else f"/{s.lr_factor:g}"
        step = "-" if s.last_step is None else str(s.last_step)
        rows.append(
            (name, s.health, step, _age(s.age_s), _num(s.lr), cut, finding, decision, _ack(s))
        )
    if len(rows) == 1:
        return "no runs found"
    rows = [tuple(_clip(c) for c in r) for r in rows]  # one odd run must not widen every line
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {2, 3, 4, 5}  # numbers align right
    lines = [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return "\n".join(lines)


def _clip(cell: str, width: int = 48) -> str:
    """``cell`` cut to ``width`` characters, keeping its end (a run's leaf, a number's digits)."""
    return cell if len(cell) <= width else "…" + cell[-(width - 1) :]
