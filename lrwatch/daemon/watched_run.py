"""One watched run: its persistent state and :func:`run_once`, the daemon's whole per-run job.

:func:`run_once` does reader -> analyzer -> decisions -> report / hooks, and in apply mode the
control file, behind :class:`~lrwatch.daemon.rails.Rails`. The run's state (reader offsets, analyzer
state, issued and acknowledged actions) is saved atomically to ``<run>/lrwatch_daemon/state.json``
after every change (or, with ``defer_save``, after every decision and later for the rest) and
reloaded at start, so a restarted daemon neither forgets nor repeats. The watch loop that calls
it lives in :mod:`.serve`, through :class:`~lrwatch.daemon.runs.Daemon`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from lrwatch import control, schema
from lrwatch.daemon.hook_jobs import HookJobs
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import DecisionSink, Mode, finding_line, read_audit
from lrwatch.daemon.rails import Issued, Ledger, Rails
from lrwatch.daemon.tally import Tally
from lrwatch.errors import LrwatchError
from lrwatch.events.reader import RunReader
from lrwatch.schema import Decision, Finding, Scalar, Severity

logger = logging.getLogger(__name__)

STATE_FILENAME = "state.json"  # in <run>/lrwatch_daemon/
STATE_VERSION = 1


class Analyzer(Protocol):
    """What the daemon needs from :class:`lrwatch.analysis.analyzer.RunAnalyzer`."""

    @property
    def findings(self) -> Sequence[Finding]: ...

    @property
    def advice_only(self) -> bool:
        """True for a run not written by lrwatch's hook: nothing there reads a control file."""

    @property
    def why_quiet(self) -> dict[tuple[str, str, int], str]:
        """Why each warning or critical finding led to no decision, by (kind, tag, step)."""

    def feed(
        self, scalars: Iterable[Scalar], *, live: bool = False, hooked: bool = False
    ) -> list[Decision]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WatchedRun:
    """Everything the daemon keeps about one run; built from ``state.json`` when there is one.

    ``hook_jobs`` carries the hook runs of an earlier object for the same run in this process
    (rebuilt after a failed pass): runs still in flight there must not be started again.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        analyzer_factory: Callable[[], Analyzer],
        mode: Mode,
        hook_jobs: HookJobs | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self._analyzer_factory = analyzer_factory
        self.reader = RunReader(self.run_dir)
        self.analyzer = analyzer_factory()
        self.ledger = Ledger()
        self.sink = DecisionSink(self.run_dir, mode=mode)
        # Hook runs owed to decisions, durable in the audit log (see hook_jobs).
        self.hook_jobs = hook_jobs if hook_jobs is not None else HookJobs(self.run_dir)
        self.audited: set[int] = set()  # action ids whose decision line is in the audit log
        self.recorded: set[tuple[Any, ...]] = set()  # decisions with a line (see _record_key)
        self.outbox: list[Decision] = []  # decided, not yet fully written (a full disk)
        self.unacked: list[tuple[int, int, float | None]] = []  # (id, step, lr) acks to record
        self.dirty = False  # state changed since the last successful save
        self.tally: Tally | None = None  # serve's counters and --json stream, when it has them
        self._hooked = False
        self.load()
        self._recall_audit()
        # One daemon per run: a temporary state file is one a killed daemon left behind.
        for stale in self.state_path.parent.glob(f".{STATE_FILENAME}.*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        if mode == "apply":
            self.outbox.extend(_orphans(self.run_dir, self.audited))

    @property
    def hooked(self) -> bool:
        """Whether lrwatch's hook writes this run (its event file has the ``.lrwatch`` suffix)."""
        if not self._hooked:
            self._hooked = any(self.run_dir.glob(f"*tfevents*{schema.HOOK_FILE_SUFFIX}"))
        return self._hooked

    @property
    def state_path(self) -> Path:
        return self.run_dir / schema.DAEMON_SUBRUN / STATE_FILENAME

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "reader": self.reader.state_dict(),
            "analyzer": self.analyzer.state_dict(),
            "ledger": self.ledger.state_dict(),
        }

    def load(self) -> None:
        """Resume from ``state.json``; an unreadable one means starting over, with a warning.

        Starting over re-reads the run from the beginning; the control file still prevents
        issuing an action twice (see :func:`issue`).
        """
        try:
            state = json.loads(self.state_path.read_text())
            if int(state["version"]) > STATE_VERSION:
                raise ValueError(f"version {state['version']} is newer than this lrwatch")
            self.reader.load_state_dict(state["reader"])
            self.analyzer.load_state_dict(state["analyzer"])
            self.ledger.load_state_dict(state["ledger"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning("%s: ignoring daemon state (%s); starting over", self.state_path, err)
            self.reader = RunReader(self.run_dir)
            self.analyzer = self._analyzer_factory()
            self.ledger = Ledger()
        else:
            logger.info("%s: resumed daemon state", self.run_dir)

    def _recall_audit(self) -> None:
        """Seed what the audit log already says, so a restart after a crash (state not saved)
        writes no decision or acknowledgement line twice, and runs the hooks still owed."""
        records = read_audit(self.run_dir)
        if not self.hook_jobs.recalled:
            self.hook_jobs.recall(records)
        for record in records:
            event, action_id = record.get("event"), record.get("action_id")
            if event == "decision":
                self.recorded.add(_record_key(record))
            if not isinstance(action_id, int):
                continue
            if event == "decision":
                self.audited.add(action_id)
            elif event == "acknowledged":
                self.ledger.acked.add(action_id)

    def save(self) -> bool:
        """Write the state atomically: a daemon killed mid-write leaves the previous state.

        Returns False (after a warning) when it could not be written, e.g. on a full disk.
        """
        path = self.state_path
        try:
            path.parent.mkdir(exist_ok=True)
            # Private to lrwatch, so NaN in the analyzer's history may stay NaN (Python's json).
            text = json.dumps(self.state_dict())
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except (OSError, ValueError, TypeError) as err:
            logger.warning("%s: cannot save daemon state: %s", path, err)
            return False
        return True

    def close(self) -> None:
        self.sink.close()


def run_once(
    run: WatchedRun,
    *,
    rails: Rails | None = None,
    hooks: HookRunner | None = None,
    defer_save: bool = False,
) -> list[Decision]:
    """Read what is new in one run, decide, and send each decision everywhere it goes.

    In apply mode (``run.sink.mode``) each decision the rails allow becomes a control-file
    action. Returns the decisions taken. Outputs that a full disk refused wait in the run's
    outbox and go out, in order and once, on a later pass; the state is saved only when nothing
    waits, so a daemon killed meanwhile re-derives them from the last saved state.

    ``defer_save``: save the state only when the pass issued, recorded or acknowledged
    something; otherwise leave ``run.dirty`` set for the caller to save later (the daemon does
    within ``SAVE_SECS``). A daemon killed before then reads the same records again and derives
    the same decisions, which the audit log and the control file already hold: nothing repeats.
    """
    scalars = run.reader.poll()
    decisions: list[Decision] = []
    if scalars:
        closed = _reach(run, scalars)
        read_back(run, scalars)
        seen = len(run.analyzer.findings)
        decisions = run.analyzer.feed(scalars, live=True, hooked=run.hooked)
        run.outbox.extend(decisions)
        decided = [f for d in decisions for f in d.findings]
        new = list(run.analyzer.findings)[seen:]
        quiet = [f for f in new if f not in decided]
        if run.tally is not None:
            run.tally.points(run.run_dir, len(scalars))
            run.tally.findings(run.run_dir, new, decided=decided, why=run.analyzer.why_quiet)
        for f in quiet:  # printed as they happen: a warning nobody acts on says why
            if f.severity is not Severity.INFO:
                why = run.analyzer.why_quiet.get((f.kind.value, f.tag, f.step))
                logger.warning("%s", finding_line(run.run_dir, f, why))
        run.sink.mark_findings(quiet)
        run.dirty = True
    before = (len(run.ledger.issued), len(run.ledger.acked), len(run.recorded))
    deliver(run, rails or Rails(), hooks)
    if hooks is not None:
        run.hook_jobs.pump(hooks)
    if scalars:
        run.sink.follow(band=run.hooked, force=closed)
    urgent = before != (len(run.ledger.issued), len(run.ledger.acked), len(run.recorded))
    if run.dirty and not run.outbox and not run.unacked and (urgent or not defer_save):
        run.dirty = not run.save()
    return decisions


def _reach(run: WatchedRun, scalars: list[Scalar]) -> bool:
    """Tell the sink which steps the new points span; True when the run has closed."""
    first = last = scalars[0].step
    closed = False
    for s in scalars:
        first, last = min(first, s.step), max(last, s.step)
        closed = closed or s.tag == schema.CLOSED
    run.sink.reach(first, last)
    return closed


def deliver(run: WatchedRun, rails: Rails, hooks: HookRunner | None) -> None:
    """Send what waits (acknowledgements, then decisions), oldest first; stop at a full disk."""
    while run.unacked:
        action_id, step, lr = run.unacked[0]
        try:
            ack = run.sink.acknowledge(action_id, step=step, lr=lr)
        except OSError as err:
            logger.warning(
                "%s: ack of #%d not recorded yet (%s); will retry", run.run_dir, action_id, err
            )
            return
        run.ledger.acked.add(action_id)
        run.unacked.pop(0)
        if run.tally is not None:
            run.tally.acknowledged(ack)
    while run.outbox:
        if not _deliver_one(run, run.outbox[0], rails, hooks):
            return
        run.outbox.pop(0)


def _deliver_one(
    run: WatchedRun, decision: Decision, rails: Rails, hooks: HookRunner | None
) -> bool:
    """Issue (apply mode) and record one decision; False if a write failed and must be retried."""
    action_id, held = None, None
    key = _decision_key(decision)
    if key in run.recorded:
        return True  # re-derived after a restart: its line is there, its hook runs recalled
    try:
        if run.sink.mode == "apply":
            action_id, held = issue(run, decision, rails)
            if action_id is not None and action_id in run.audited:
                return True  # re-derived after a crash: its line is there, its hook runs recalled
        owed = [str(h) for h in hooks.hooks] if hooks is not None else []
        record = run.sink.emit(decision, action_id=action_id, held_back=held, hooks=owed)
    except OSError as err:
        logger.warning(
            "%s: decision at step %d waits (%s); will retry", run.run_dir, decision.step, err
        )
        return False
    run.recorded.add(key)
    if run.tally is not None:
        run.tally.decision(record)
    if action_id is not None:
        run.audited.add(action_id)
    run.hook_jobs.owe(record)  # started by run_once's pump, right after this
    return True


def read_back(run: WatchedRun, scalars: Sequence[Scalar]) -> None:
    """Follow the effective LR (for the LR floor) and queue the hook's acknowledgements."""
    lr_at = {s.step: s.value for s in scalars if s.tag == schema.LR}
    if lr_at:
        run.ledger.lr = lr_at[max(lr_at)]
    waiting = {a[0] for a in run.unacked}
    for s in scalars:
        if s.tag != schema.CONTROL_ACK or not math.isfinite(s.value):
            continue
        action_id = int(s.value)
        if action_id not in run.ledger.acked and action_id not in waiting:
            waiting.add(action_id)
            run.unacked.append((action_id, s.step, lr_at.get(s.step)))


def _decision_key(decision: Decision) -> tuple[Any, ...]:
    """What identifies a decision across restarts: decisions no longer depend on where reads
    stop, so a re-derived one is equal in all of these (held-back ones have no action id)."""
    return (
        decision.step,
        decision.action.value,
        decision.factor,
        decision.max_norm,
        decision.reason,
    )


def _record_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """:func:`_decision_key` of a decision line of the audit log."""
    max_norm = record.get("max_norm")
    with contextlib.suppress(TypeError, ValueError):
        max_norm = None if max_norm is None else float(max_norm)  # "inf" in strict JSON
    return (
        record.get("step"),
        record.get("action"),
        record.get("factor"),
        max_norm,
        record.get("reason"),
    )


def issue(run: WatchedRun, decision: Decision, rails: Rails) -> tuple[int | None, str | None]:
    """Write ``decision`` to the control file unless the rails hold it back: (id, why not).

    Raises OSError when the control file could not be written for now (a full disk): the
    caller retries later. An untrusted control file is a reason to hold back, not to retry.
    """
    # The step makes the reason unique per decision: a daemon killed between writing the control
    # file and saving its state re-derives the same decision on restart and finds it here, as
    # does a retry after a full disk refused the audit line. It is found before the rails are
    # asked, since they would now count the action against itself.
    reason = f"{decision.reason} (lrwatch decision at step {decision.step})"
    try:
        action = _already_issued(run.run_dir, decision, reason)
    except LrwatchError as err:
        logger.warning("%s: control file not trusted: %s", run.run_dir, err)
        return None, f"control file: {err}"
    if action is not None:
        if not any(i.id == action.id for i in run.ledger.issued):
            run.ledger.issued.append(Issued(action.id, decision.step, decision.action))
        return action.id, None
    held = rails.hold_back(decision, run.ledger)
    if held is None and run.analyzer.advice_only:
        held = "advice only: this run was not written by lrwatch's hook"
    if held is not None:
        return None, held
    try:
        action = control.append_action(
            run.run_dir,
            action=decision.action,
            factor=decision.factor,
            max_norm=decision.max_norm,
            to_step=decision.to_step,
            reason=reason,
            source="daemon",
        )
    except LrwatchError as err:
        logger.warning("%s: could not write the control file: %s", run.run_dir, err)
        return None, f"control file: {err}"
    run.ledger.issued.append(Issued(action.id, decision.step, decision.action))
    return action.id, None


_MARK = re.compile(r"^(?P<reason>.*) \(lrwatch decision at step (?P<step>\d+)\)$", re.DOTALL)


def _orphans(run_dir: Path, audited: set[int]) -> list[Decision]:
    """The daemon's own actions in the control file that have no decision line (it was
    killed between the two writes), as decisions to adopt: delivering them finds the action
    already issued, writes the missing line and runs the hooks, instead of deciding anew."""
    path = run_dir / schema.CONTROL_FILENAME
    try:
        actions = control.read_control(path).actions if os.path.lexists(path) else ()
    except LrwatchError as err:
        logger.warning("%s: control file not trusted: %s", run_dir, err)
        return []
    adopted = []
    for action in actions:
        mark = _MARK.match(action.reason)
        if action.source != "daemon" or action.id in audited or mark is None:
            continue
        logger.warning("%s: adopting action #%d, issued before a crash", run_dir, action.id)
        adopted.append(
            Decision(
                int(mark["step"]), action.action, mark["reason"], action.factor, action.max_norm
            )
        )
    return adopted


def _already_issued(run_dir: Path, decision: Decision, reason: str) -> schema.Action | None:
    path = run_dir / schema.CONTROL_FILENAME
    if not os.path.lexists(path):
        return None
    for action in control.read_control(path).actions:
        if (
            action.source == "daemon"
            and action.action is decision.action
            and action.reason == reason
        ):
            return action
    return None
