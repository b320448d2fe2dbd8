"""Hook runs as durable jobs: every decision's hooks run until each has ended well once.

The audit log is the job table. A decision line lists the hook executables that owe it a run
(``hooks``); after each run of one of them a ``hooked`` line records the decision id, the hook,
the attempt and how it ended. A (decision, hook) pair without an ``ok`` line and with attempts
left is owed: it is started on the daemon's next pass, and a restarted daemon reads what is
still owed back from the audit log and starts it again. So every hook runs at least once per
decision, whatever kills the daemon. Each run gets the decision's id in
``LRWATCH_DECISION_ID`` (also ``decision_id`` in the JSON) and its attempt number in
``LRWATCH_HOOK_ATTEMPT``: a hook that skips an id it has already handled takes effect exactly
once. The one window where a hook runs twice is a kill of the daemon after the hook started and
before its ``hooked`` line reached the disk (the restarted daemon cannot know how it ended).

A run that fails (non-zero exit, timeout, could not start) gets its ``hooked`` line with
``ok: false`` and is retried after ``HookRunner.retry_after`` (5 s, then 30 s), at most
``HookRunner.attempts`` runs in all (3), counted across restarts; after the last it is given up
with a warning. Decision lines written before lrwatch recorded hooks (no ``hooks`` field) owe
nothing, and a hook no longer passed to ``serve`` is not run for old decisions.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrwatch.daemon.notify import HookResult, HookRunner
from lrwatch.daemon.outputs import append_audit, hooked_record

logger = logging.getLogger(__name__)

DECISION_ID_ENV = "LRWATCH_DECISION_ID"  # the idempotency key a hook can deduplicate on
ATTEMPT_ENV = "LRWATCH_HOOK_ATTEMPT"  # 1 for the first run of a hook for a decision


@dataclass
class Job:
    """One run of one hook owed to one decision; ``record`` is the decision line (its stdin)."""

    record: dict[str, Any]
    hook: str
    attempt: int = 1  # the run to start next
    failed_at: float | None = None  # wall time the last run failed: the retry waits from it
    running: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.record["decision_id"], self.hook)


class HookJobs:
    """The hook runs one watched run owes: started each pass, closed by ``hooked`` lines.

    Example::

        jobs = HookJobs(run_dir)
        jobs.recall(read_audit(run_dir))   # at start: what a killed daemon left owed
        jobs.owe(record)                   # after a decision line was written
        jobs.pump(runner)                  # every pass: ended runs in, due runs out
    """

    def __init__(self, run_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.run_dir = Path(run_dir)
        self.jobs: dict[tuple[str, str], Job] = {}
        self._clock = clock
        # Filled by the hook threads, emptied by the daemon's loop: (job, result, refused line).
        self._ended: queue.SimpleQueue[tuple[Job, HookResult, dict[str, Any] | None]]
        self._ended = queue.SimpleQueue()
        self._refused: list[dict[str, Any]] = []  # hooked lines a full disk refused, in order
        self._queue_full = False
        self.recalled = False

    def owe(self, record: dict[str, Any]) -> None:
        """Owe a run of every hook the decision line ``record`` lists."""
        for hook in record.get("hooks") or ():
            job = Job(record, str(hook))
            self.jobs.setdefault(job.key, job)

    def recall(self, records: Iterable[dict[str, Any]]) -> None:
        """Owe what the audit log's decision lines list and no ``ok`` hooked line closed."""
        self.recalled = True
        decisions: dict[str, dict[str, Any]] = {}
        runs: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
        for r in records:
            if r.get("event") == "decision" and isinstance(r.get("decision_id"), str):
                decisions.setdefault(r["decision_id"], r)
            elif r.get("event") == "hooked":
                runs.setdefault((r.get("decision_id"), r.get("hook")), []).append(r)
        for record in decisions.values():
            for hook in record.get("hooks") or ():
                ended = runs.get((record["decision_id"], hook), [])
                if any(r.get("ok") is True for r in ended):
                    continue
                job = Job(record, str(hook), attempt=1 + max(_attempts(ended), default=0))
                job.failed_at = max(_times(ended), default=None)
                self.jobs[job.key] = job
        if self.jobs:
            logger.info(
                "%s: %d hook run(s) owed from before a restart", self.run_dir, len(self.jobs)
            )

    def pump(self, runner: HookRunner) -> None:
        """Take in the runs that ended, retry refused lines, start every run that is due."""
        self._take_ended(runner.attempts)
        self._write_refused()
        configured = {str(h) for h in runner.hooks}
        now = self._clock()
        for job in list(self.jobs.values()):
            if job.running:
                continue
            if job.attempt > runner.attempts:
                del self.jobs[job.key]  # recalled, and given up before the restart
            elif job.hook not in configured:
                logger.warning(
                    "%s: hook %s owes decision %s a run but is no longer configured; not run",
                    self.run_dir, job.hook, job.key[0],
                )  # fmt: skip
                del self.jobs[job.key]
            elif _due(job, runner.retry_after, now) and not self._start(job, runner):
                return  # the queue is full: the rest waits for a later pass

    @property
    def idle(self) -> bool:
        """Nothing owed, nothing running and nothing left to write."""
        return not self.jobs and not self._refused

    def _start(self, job: Job, runner: HookRunner) -> bool:
        payload = (json.dumps(job.record, allow_nan=False) + "\n").encode()
        env = {DECISION_ID_ENV: job.key[0], ATTEMPT_ENV: str(job.attempt)}
        job.running = True
        future = runner.submit(
            Path(job.hook), payload, env=env, done=functools.partial(self._ended_run, job)
        )
        if future.cancelled():
            job.running = False
            if not self._queue_full:
                logger.warning("%s: hook queue full; runs wait for a later pass", self.run_dir)
            self._queue_full = True
            return False
        self._queue_full = False
        return True

    def _ended_run(self, job: Job, result: HookResult) -> None:
        """On a hook thread, at once: the ``hooked`` line, so the window for a rerun is short."""
        line = hooked_record(
            job.record,
            hook=job.hook,
            attempt=job.attempt,
            returncode=result.returncode,
            timed_out=result.timed_out,
            wall_time=self._clock(),
        )
        refused = None
        try:
            append_audit(self.run_dir, line)
        except OSError as err:
            logger.warning("%s: hooked line waits (%s); will retry", self.run_dir, err)
            refused = line
        self._ended.put((job, result, refused))

    def _take_ended(self, attempts: int) -> None:
        while True:
            try:
                job, result, refused = self._ended.get_nowait()
            except queue.Empty:
                return
            job.running = False
            if refused is not None:
                self._refused.append(refused)
            if result.ok or job.attempt >= attempts:
                del self.jobs[job.key]
                if not result.ok:
                    logger.warning(
                        "%s: hook %s failed %d times for decision %s; given up",
                        self.run_dir, job.hook, job.attempt, job.key[0],
                    )  # fmt: skip
            else:
                job.attempt += 1
                job.failed_at = self._clock()

    def _write_refused(self) -> None:
        while self._refused:
            try:
                append_audit(self.run_dir, self._refused[0])
            except OSError:
                return
            self._refused.pop(0)


def _due(job: Job, retry_after: tuple[float, ...], now: float) -> bool:
    """A first run is due at once; run n waits ``retry_after[n - 2]`` after the last failure."""
    if job.failed_at is None or job.attempt < 2:
        return True
    delay = retry_after[min(job.attempt - 2, len(retry_after) - 1)] if retry_after else 0.0
    return now >= job.failed_at + delay


def _attempts(lines: list[dict[str, Any]]) -> Iterable[int]:
    return (r["attempt"] for r in lines if isinstance(r.get("attempt"), int))


def _times(lines: list[dict[str, Any]]) -> Iterable[float]:
    return (float(r["wall_time"]) for r in lines if isinstance(r.get("wall_time"), int | float))
