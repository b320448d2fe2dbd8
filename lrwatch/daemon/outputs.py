"""Where the daemon's decisions go: an audit log, TensorBoard markers and one console line.

Each run gets three records of every decision, so a person can answer "what did lrwatch do to my
run, and why?" from whichever place they look first:

1. ``<run>/lrwatch_audit.jsonl``: append-only, one JSON object per line (see
   :func:`decision_record` for the fields), plus an ``acknowledged`` line when the hook's ack is
   read back from the event files and a ``hooked`` line after each run of a hook executable
   (:func:`hooked_record`). :func:`read_audit` reads it back.
2. TensorBoard: scalar markers and a text summary in the sub-run ``<run>/lrwatch_daemon/``, at the
   decision's step, so they line up with the trainer's own charts. A marker is a spike from a 0
   baseline that spans the steps the run has reached (see :class:`Spans`), so a chart of
   decisions has the loss chart's step range instead of zooming onto its few points; the
   update-ratio reference band spans them too.
3. The console, through :mod:`logging`: one line per decision.

An output that fails (a full disk, a vanished run) logs a warning and never stops the daemon.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from lrwatch import schema
from lrwatch.daemon.spans import Spans, band_values, staircase
from lrwatch.schema import ActionKind, Decision, Finding, Severity

logger = logging.getLogger(__name__)

AUDIT_FILENAME = schema.AUDIT_FILENAME
RECORD_VERSION = 1  # of the audit lines and of the JSON that hook executables receive

Mode = Literal["recommend", "apply"]
MODES: tuple[Mode, ...] = ("recommend", "apply")

# Marker value of a finding: 0 stays free for "nothing", so a chart's baseline means no finding.
SEVERITY_LEVEL = {Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}


class MarkerWriter(Protocol):
    """What :class:`DecisionSink` needs from :class:`lrwatch.events.writer.EventWriter`."""

    def add_scalars(
        self, step: int, tags: list[str], values: list[float], *, wall_time: float | None = None
    ) -> None: ...

    def add_text(
        self, step: int, tag: str, text: str, *, wall_time: float | None = None
    ) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool: ...

    def close(self) -> None: ...


def audit_path(run_dir: Path) -> Path:
    """The audit log of a run."""
    return Path(run_dir) / AUDIT_FILENAME


def decision_id(run: str, decision: Decision) -> str:
    """A stable id of one decision of one run, safe as a file name: ``<step>-<16 hex digits>``.

    It is a hash of what identifies a decision across daemon restarts (the run, step, action,
    factor or max_norm and reason), so hooks can deduplicate on it (``LRWATCH_DECISION_ID``).
    """
    key = [run, decision.step, decision.action.value, decision.factor, decision.max_norm]
    digest = hashlib.sha256(json.dumps([*key, decision.reason]).encode()).hexdigest()
    return f"{decision.step}-{digest[:16]}"


def decision_record(
    decision: Decision,
    *,
    run: str,
    mode: Mode,
    action_id: int | None,
    wall_time: float,
    held_back: str | None = None,
    hooks: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON document of one decision: an audit line, and what hook executables get on stdin.

    ``decision.to_json()`` (step, action, factor | max_norm, reason, findings with evidence) plus
    ``version``, ``event`` ("decision"), ``decision_id`` (:func:`decision_id`), ``run``,
    ``mode``, ``applied`` (an action was written to the control file), ``action_id`` (its id,
    else null), ``held_back`` (in apply mode, why it was not applied, else null), ``hooks`` (the
    hook executables that owe this decision a run), ``wall_time`` (Unix seconds), ``time`` (the
    same, ISO 8601 UTC) and ``lrwatch_version``.
    """
    from lrwatch import __version__

    return {
        "version": RECORD_VERSION,
        "event": "decision",
        "decision_id": decision_id(run, decision),
        "run": run,
        "mode": mode,
        "applied": action_id is not None,
        "action_id": action_id,
        "held_back": held_back,
        "hooks": list(hooks),
        "wall_time": wall_time,
        "time": _iso(wall_time),
        "lrwatch_version": __version__,
        **decision.to_json(),
    }


def ack_record(
    action_id: int, *, run: str, step: int, lr: float | None, wall_time: float
) -> dict[str, Any]:
    """The audit line written when the hook's acknowledgement of ``action_id`` is read back."""
    return {
        "version": RECORD_VERSION,
        "event": "acknowledged",
        "run": run,
        "action_id": action_id,
        "step": step,
        "lr": lr if lr is None or math.isfinite(lr) else str(lr),  # strict JSON, as in schema
        "wall_time": wall_time,
        "time": _iso(wall_time),
    }


def hooked_record(
    record: dict[str, Any],
    *,
    hook: str,
    attempt: int,
    returncode: int | None,
    timed_out: bool,
    wall_time: float,
) -> dict[str, Any]:
    """The audit line written after one run of one hook executable for the decision ``record``.

    ``ok`` is true when the hook exited 0 within its timeout; ``returncode`` is negative when a
    signal ended it and null when it could not be started. A decision line's hooks without an
    ``ok`` line (and with attempts left) are run again by a restarted daemon.
    """
    return {
        "version": RECORD_VERSION,
        "event": "hooked",
        "run": record["run"],
        "decision_id": record["decision_id"],
        "step": record["step"],
        "hook": hook,
        "attempt": attempt,
        "ok": returncode == 0 and not timed_out,
        "returncode": returncode,
        "timed_out": timed_out,
        "wall_time": wall_time,
        "time": _iso(wall_time),
    }


# Lines come from the daemon's loop and from its hook threads. A full disk can take part of a
# line, which is then cut off with ftruncate: another thread's line appended in between would
# be cut off with it, so appends in one process take turns.
_APPEND_LOCK = threading.Lock()


def append_audit(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one line to the run's audit log.

    One ``write`` on an ``O_APPEND`` descriptor, so a concurrent reader or a second writer never
    sees half a line interleaved with another. Raises OSError when the line is not on disk whole.
    """
    line = (json.dumps(record, sort_keys=False, allow_nan=False) + "\n").encode()
    with _APPEND_LOCK:
        _append_line(audit_path(run_dir), line)


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
        except OSError:
            written = -1
        if written != len(line):
            # A full disk can take part of a line: cut it off, so a retry appends it whole.
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, f"{path}: line not written whole")
    finally:
        os.close(fd)


def read_audit(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's audit log, oldest first; ``[]`` when there is none.

    A torn last line (the daemon killed mid-write) is skipped silently; any other unreadable line
    is skipped with a warning, and records from a newer major version are kept as they are.
    """
    try:
        data = audit_path(run_dir).read_bytes()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            if number < len(lines):  # the last piece without "\n" is a write in progress
                logger.warning("%s line %d is not JSON; skipped", audit_path(run_dir), number)
            continue
        if isinstance(doc, dict):
            records.append(doc)
    return records


def _iso(wall_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_time))


def console_line(record: dict[str, Any]) -> str:
    """The one-line human summary of a decision record."""
    what = record["action"]
    if "factor" in record:
        what += f" /{record['factor']}"
    if "max_norm" in record:
        what += f" max_norm={record['max_norm']:.4g}"
    if "to_step" in record:
        what += f" {'on the weights of' if what == 'stop' else 'to'} step {record['to_step']}"
    if record["applied"]:
        status = f"applied as action #{record['action_id']}"
    else:
        held = record.get("held_back")
        status = f"recommended (not applied: {held})" if held else "recommended"
    return f"{record['run']} step {record['step']}: {what} {status}: {record['reason']}"


def finding_line(run: Path, f: Finding, why: str | None) -> str:
    """One line for a warning or critical finding that led to no decision, and why not."""
    return (
        f"{run} step {f.step}: {f.severity.value} {f.kind.value} on {f.tag}, no decision "
        f"({why or 'no response for this finding'}): {f.message}"
    )


def console_level(decision: Decision, *, applied: bool) -> int:
    """WARNING when something critical was seen or the running job is being changed, else INFO."""
    critical = any(f.severity is Severity.CRITICAL for f in decision.findings)
    if critical or applied or decision.action is ActionKind.STOP:
        return logging.WARNING
    return logging.INFO


def finding_markers(findings: Iterable[Finding]) -> dict[int, dict[str, float]]:
    """TensorBoard markers of findings by step: the severity level (1 info, 2 warning, 3 critical).

    When one kind repeats at one step, the worst severity wins.
    """
    by_step: dict[int, dict[str, float]] = {}
    for finding in findings:
        tag = schema.FINDING_TAG_FMT.format(finding.kind.value)
        at = by_step.setdefault(finding.step, {})
        at[tag] = max(float(SEVERITY_LEVEL[finding.severity]), at.get(tag, 0.0))
    return by_step


def _short_number(value: Any) -> Any:
    """4 significant digits for a person (the audit log keeps every digit)."""
    return f"{value:.4g}" if isinstance(value, float) else value


def decision_text(record: dict[str, Any]) -> str:
    """The markdown shown in TensorBoard's Text tab for one decision."""
    lines = [f"**{console_line(record)}**", ""]
    for f in record["findings"]:
        evidence = ", ".join(f"{k}={_short_number(v)}" for k, v in f["evidence"].items())
        lines.append(
            f"- {f['severity']} {f['kind']} on `{f['tag']}` at step {f['step']}: "
            f"{f['message']} ({evidence})"
        )
    return "\n".join(lines)


ACKNOWLEDGED_TAG = schema.DECISION_TAG_FMT.format("acknowledged")  # actions the trainer applied
SPAN_EVERY_S = 60.0  # the baseline and the band follow the run at most this often


def _event_writer(logdir: Path) -> MarkerWriter:
    from lrwatch.events.writer import EventWriter  # the daemon's only use of the hook-side writer

    return EventWriter(logdir, filename_suffix=".lrwatch_daemon")


class DecisionSink:
    """Sends each decision of one run to the audit log, TensorBoard and the console.

    Args:
        run_dir: the run the decisions are about.
        mode: ``"recommend"`` or ``"apply"``, recorded with every decision.
        writer_factory: builds the TensorBoard writer for the daemon's sub-run (tests pass their
            own); it is called on the first marker or span, so a run never seen gets none.

    Example::

        sink = DecisionSink(run_dir, mode="apply")
        record = sink.emit(decision, action_id=3)   # the hook JSON, ready for notify
        sink.close()
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        mode: Mode,
        writer_factory: Callable[[Path], MarkerWriter] = _event_writer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in MODES:
            from lrwatch.errors import ConfigError

            raise ConfigError(f"mode must be one of {MODES}, not {mode!r}")
        self.run_dir = Path(run_dir)
        self.mode: Mode = mode
        self._writer_factory = writer_factory
        self._clock = clock
        self._writer: MarkerWriter | None = None
        self._spans: Spans | None = None
        self._spanned_at = clock()  # the first span waits too: the run's first rows may be late
        self._latest: int | None = None  # latest step seen in the run
        self._band: dict[str, float] = {}

    def emit(
        self,
        decision: Decision,
        *,
        action_id: int | None,
        held_back: str | None = None,
        hooks: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Record one decision everywhere; returns its record (the JSON for hook executables).

        ``action_id`` is the control-file id when the decision was applied; ``held_back`` says
        why an apply-mode decision was not; ``hooks`` are the executables that owe it a run.
        """
        now = self._clock()
        record = decision_record(
            decision,
            run=str(self.run_dir),
            mode=self.mode,
            action_id=action_id,
            wall_time=now,
            held_back=held_back,
            hooks=hooks,
        )
        self._append(record)
        logger.log(console_level(decision, applied=action_id is not None), console_line(record))
        spans = self._spans_now()
        tag, new, start = staircase(decision)
        points = self._spikes(finding_markers(decision.findings))
        points += spans.step_to(tag, decision.step, new, start=start)
        self._write_points(points, (decision.step, decision_text(record)), now)
        return record

    def mark_findings(self, findings: Iterable[Finding]) -> None:
        """Put findings that led to no decision on the TensorBoard step axis too."""
        self._write_points(self._spikes(finding_markers(findings)), None, self._clock())

    def reach(self, first: int, last: int) -> None:
        """The run's new points span ``first``..``last``: markers' baselines start at the
        first step ever seen, and :meth:`follow` carries them to the latest."""
        spans = self._spans_now()
        # The lowest step yet: mon.log values reach the file before the batched rows of earlier
        # steps. Tags already drawn keep their own start (each tag only moves forward).
        spans.first = first if spans.first is None else min(spans.first, first)
        self._latest = max(last, self._latest if self._latest is not None else last)

    def follow(self, *, band: bool, force: bool = False) -> None:
        """Carry the baseline and, with ``band`` (a run with lrwatch's update ratio), the ratio
        band to the latest step reached, at most once every ``SPAN_EVERY_S`` unless ``force``."""
        self._band = band_values() if band else {}
        now = self._clock()
        if self._latest is not None and (force or now - self._spanned_at >= SPAN_EVERY_S):
            self._spanned_at = now
            self._write_points(self._spans_now().extend(self._latest, self._band), None, now)

    def acknowledge(self, action_id: int, *, step: int, lr: float | None = None) -> dict[str, Any]:
        """Record that the trainer applied ``action_id`` at ``step`` (read back from its events);
        returns the audit record."""
        now = self._clock()
        record = ack_record(action_id, run=str(self.run_dir), step=step, lr=lr, wall_time=now)
        self._append(record)
        logger.info(
            "%s: action #%d acknowledged at step %d (lr %s)", self.run_dir, action_id, step, lr
        )
        # Beside the decisions, on their chart: the gap between deciding and applying shows.
        points = self._spans_now().step_to(ACKNOWLEDGED_TAG, step, lambda n: n + 1.0)
        self._write_points(points, None, now)
        return record

    def close(self) -> None:
        """Carry the spans to the latest step, then flush and close the TensorBoard writer."""
        if self._spans is not None:
            spans, latest = self._spans, self._latest
            points = spans.flush() if latest is None else spans.extend(latest, self._band)
            self._write_points(points, None, self._clock())
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as err:  # broad: closing must not take the daemon down
                logger.warning("%s: closing the TensorBoard writer failed: %s", self.run_dir, err)

    def __enter__(self) -> DecisionSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _append(self, record: dict[str, Any]) -> None:
        """Append one audit line; OSError (a full disk) reaches the caller, which retries."""
        try:
            append_audit(self.run_dir, record)
        except ValueError as err:  # not strict JSON: retrying would not help
            logger.warning("%s: cannot append to the audit log: %s", self.run_dir, err)

    def _spans_now(self) -> Spans:
        """The spans, seeded with the last steps already in the sub-run (a restarted daemon)."""
        if self._spans is None:
            floor: dict[str, tuple[int, float]] = {}
            subrun = self.run_dir / schema.DAEMON_SUBRUN
            try:
                from lrwatch.events.reader import read_run  # the daemon's own files, once

                for point in read_run(subrun) if subrun.is_dir() else []:
                    if point.step >= floor.get(point.tag, (point.step, 0.0))[0]:
                        floor[point.tag] = (point.step, point.value)
            except Exception as err:  # broad: a damaged marker file must not stop the daemon
                logger.warning("%s: cannot read earlier markers: %s", subrun, err)
            self._spans = Spans(floor)
        return self._spans

    def _spikes(self, by_step: dict[int, dict[str, float]]) -> list[tuple[int, str, float]]:
        spans = self._spans_now()
        return [
            p
            for step, values in sorted(by_step.items())
            for tag, value in values.items()
            for p in spans.spike(tag, step, value)
        ]

    def _write_points(
        self, points: list[tuple[int, str, float]], text: tuple[int, str] | None, wall_time: float
    ) -> None:
        if not points and text is None:
            return
        by_step: dict[int, dict[str, float]] = {}
        for step, tag, value in sorted(points, key=lambda p: p[0]):  # stable: per-tag order kept
            by_step.setdefault(step, {})[tag] = value
        try:
            if self._writer is None:
                self._writer = self._writer_factory(self.run_dir / schema.DAEMON_SUBRUN)
            for step, values in by_step.items():
                self._writer.add_scalars(
                    step, list(values), list(values.values()), wall_time=wall_time
                )
            if text is not None:
                self._writer.add_text(
                    text[0], schema.DECISION_TEXT_TAG, text[1], wall_time=wall_time
                )
            # The daemon's markers are rare and the user is looking now: do not batch them.
            self._writer.flush(timeout=5.0)
        except Exception as err:  # broad: TensorBoard output is best effort, the audit log is not
            logger.warning("%s: cannot write TensorBoard markers: %s", self.run_dir, err)
