"""One watched run: its persistent state and :func:`run_once`, the daemon's whole per-run job.

:func:`run_once` does reader -> analyzer -> decisions -> report / hooks, and in apply mode the
control file, behind :class:`~lrwatch.daemon.rails.Rails`. The run's state (reader offsets, analyzer
state, issued and acknowledged actions) is saved atomically to ``<run>/lrwatch_daemon/state.json``
after every change and reloaded at start, so a restarted daemon neither forgets nor repeats.
The watch loop that calls it lives in :mod:`.serve`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from lrwatch import control, schema
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import DecisionSink, Mode, finding_line, read_audit
from lrwatch.daemon.rails import Issued, Ledger, Rails
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

    def feed(self, scalars: Iterable[Scalar]) -> list[Decision]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WatchedRun:
    """Everything the daemon keeps about one run; built from ``state.json`` when there is one."""

    def __init__(
        self, run_dir: Path, *, analyzer_factory: Callable[[], Analyzer], mode: Mode
    ) -> None:
        self.run_dir = Path(run_dir)
        self._analyzer_factory = analyzer_factory
        self.reader = RunReader(self.run_dir)
        self.analyzer = analyzer_factory()
        self.ledger = Ledger()
        self.sink = DecisionSink(self.run_dir, mode=mode)
        self.audited: set[int] = set()  # action ids whose decision line is in the audit log
        self.load()
        self._recall_audit()

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
        writes no decision or acknowledgement line twice and runs no hook twice."""
        for record in read_audit(self.run_dir):
            action_id = record.get("action_id")
            if not isinstance(action_id, int):
                continue
            if record.get("event") == "decision":
                self.audited.add(action_id)
            elif record.get("event") == "acknowledged":
                self.ledger.acked.add(action_id)

    def save(self) -> None:
        """Write the state atomically: a daemon killed mid-write leaves the previous state."""
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

    def close(self) -> None:
        self.sink.close()


def run_once(
    run: WatchedRun, *, rails: Rails | None = None, hooks: HookRunner | None = None
) -> list[Decision]:
    """Read what is new in one run, decide, and send each decision everywhere it goes.

    In apply mode (``run.sink.mode``) each decision the rails allow becomes a control-file
    action. Returns the decisions taken; saves the run's state when anything was read.
    """
    scalars = run.reader.poll()
    if not scalars:
        return []
    read_back(run, scalars)
    seen = len(run.analyzer.findings)
    decisions = run.analyzer.feed(scalars)
    for decision in decisions:
        action_id, held = None, None
        if run.sink.mode == "apply":
            action_id, held = issue(run, decision, rails or Rails())
            if action_id is not None and action_id in run.audited:
                continue  # re-derived after a crash: its audit line and hooks already went out
        record = run.sink.emit(decision, action_id=action_id, held_back=held)
        if action_id is not None:
            run.audited.add(action_id)
        if hooks is not None:
            hooks.notify(record)
    decided = [f for d in decisions for f in d.findings]
    quiet = [f for f in list(run.analyzer.findings)[seen:] if f not in decided]
    for f in quiet:  # printed as they happen: a warning nobody acts on says why
        if f.severity is not Severity.INFO:
            why = run.analyzer.why_quiet.get((f.kind.value, f.tag, f.step))
            logger.warning("%s", finding_line(run.run_dir, f, why))
    run.sink.mark_findings(quiet)
    run.save()
    return decisions


def read_back(run: WatchedRun, scalars: Sequence[Scalar]) -> None:
    """Follow the effective LR (for the LR floor) and record the hook's acknowledgements."""
    lr_at = {s.step: s.value for s in scalars if s.tag == schema.LR}
    if lr_at:
        run.ledger.lr = lr_at[max(lr_at)]
    for s in scalars:
        if s.tag != schema.CONTROL_ACK or not math.isfinite(s.value):
            continue
        if (action_id := int(s.value)) not in run.ledger.acked:
            run.ledger.acked.add(action_id)
            run.sink.acknowledge(action_id, step=s.step, lr=lr_at.get(s.step))


def issue(run: WatchedRun, decision: Decision, rails: Rails) -> tuple[int | None, str | None]:
    """Write ``decision`` to the control file unless the rails hold it back: (id, why not)."""
    held = rails.hold_back(decision, run.ledger)
    if held is None and run.analyzer.advice_only:
        held = "advice only: this run was not written by lrwatch's hook"
    if held is not None:
        return None, held
    # The step makes the reason unique per decision: a daemon killed between writing the control
    # file and saving its state re-derives the same decision on restart and finds it here.
    reason = f"{decision.reason} (lrwatch decision at step {decision.step})"
    try:
        action = _already_issued(run.run_dir, decision, reason)
        if action is not None and any(i.id == action.id for i in run.ledger.issued):
            return action.id, None
        action = action or control.append_action(
            run.run_dir,
            action=decision.action,
            factor=decision.factor,
            max_norm=decision.max_norm,
            reason=reason,
            source="daemon",
        )
    except (LrwatchError, OSError) as err:
        logger.warning("%s: could not write the control file: %s", run.run_dir, err)
        return None, f"control file: {err}"
    run.ledger.issued.append(Issued(action.id, decision.step, decision.action))
    return action.id, None


def _already_issued(run_dir: Path, decision: Decision, reason: str) -> schema.Action | None:
    path = run_dir / schema.CONTROL_FILENAME
    if not path.exists():
        return None
    for action in control.read_control(path).actions:
        if (
            action.source == "daemon"
            and action.action is decision.action
            and action.reason == reason
        ):
            return action
    return None
