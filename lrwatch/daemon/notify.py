"""Runs the user's hook executables with each decision as JSON on stdin, off the daemon's loop.

Only executables the user named with ``--hook PATH`` run, as an argv list of that one path:
never through a shell, and nothing read from event or control files ever reaches the command
line. The decision travels on stdin (:func:`lrwatch.daemon.outputs.decision_record` documents the
fields). Each hook gets ``timeout`` seconds; then its whole process group gets SIGTERM and,
``kill_after`` seconds later, SIGKILL, so a hook's own children die with it. Hooks run on a few
worker threads behind a bounded queue: a slow, failing or hanging hook is reported through
:mod:`logging` and never blocks or kills the daemon. Which runs are owed, and their retries,
is :mod:`.hook_jobs`' business: this module only runs what it is handed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds: a notification that takes longer is stuck, not slow
KILL_AFTER = 2.0  # seconds between SIGTERM and SIGKILL: time for a hook to clean up
MAX_WORKERS = 2  # hooks running at once; more would compete with the trainer for CPU
MAX_PENDING = 64  # queued runs; past this, notify() drops one, HookJobs waits for a later pass
STDERR_LIMIT = 2000  # characters of a hook's stderr kept in the log line
# Seconds before the 2nd and 3rd run of a hook that failed (non-zero exit, timeout, no start):
# a webhook's endpoint down for a moment gets another chance, a broken hook is not run forever.
RETRY_AFTER = (5.0, 30.0)


def validate_hooks(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Resolve the user's hook paths, failing at startup for any that cannot run."""
    hooks = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():
            raise ConfigError(f"hook {path} does not exist or is not a file")
        if not os.access(resolved, os.X_OK):
            raise ConfigError(f"hook {path} is not executable (chmod +x {path})")
        hooks.append(resolved)
    return tuple(hooks)


@dataclass(frozen=True)
class HookResult:
    """How one run of one hook ended. ``returncode`` is negative when a signal ended it."""

    hook: Path
    returncode: int | None
    timed_out: bool
    stderr: str
    stdout: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the hook's process group (its own session, so its leader's pid is the group id)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run_hook(
    hook: Path,
    payload: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    kill_after: float = KILL_AFTER,
    env: Mapping[str, str] | None = None,
) -> HookResult:
    """Run one hook to completion (or to its timeout) and say how it ended. Blocks the caller.

    ``env`` is added to the daemon's environment (the decision id and attempt number).
    """
    proc = subprocess.Popen(
        [str(hook)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a group of its own, so a timeout reaches its children too
        close_fds=True,
        env=None if env is None else {**os.environ, **env},
    )
    timed_out = False
    try:
        out, err = proc.communicate(payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = _stop(proc, kill_after)
    finally:
        # The leader may have exited while children it left behind still run: end them too.
        _signal_group(proc.pid, signal.SIGKILL)
    return HookResult(
        hook=hook,
        returncode=proc.returncode,
        timed_out=timed_out,
        stderr=err.decode(errors="replace")[-STDERR_LIMIT:],
        stdout=out.decode(errors="replace")[-STDERR_LIMIT:],
    )


def _stop(proc: subprocess.Popen[bytes], kill_after: float) -> tuple[bytes, bytes]:
    """SIGTERM the group, then SIGKILL it if it is still there ``kill_after`` seconds later."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
    try:
        return proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        # A grandchild that left the group still holds the pipes: stop waiting for them.
        proc.kill()
        proc.wait()
        return b"", b""


def report_result(result: HookResult) -> None:
    """One log line per hook run: debug when it worked, a warning with its stderr when not."""
    if result.ok:
        logger.debug(
            "hook %s ok%s", result.hook, f": {result.stderr.strip()}" * bool(result.stderr)
        )
    elif result.timed_out:
        logger.warning(
            "hook %s timed out and was killed; stderr: %s",
            result.hook,
            result.stderr.strip() or "(empty)",
        )
    else:
        logger.warning(
            "hook %s exited with %s; stderr: %s",
            result.hook,
            result.returncode,
            result.stderr.strip() or "(empty)",
        )


def could_not_start(hook: Path, err: BaseException) -> HookResult:
    """The result of a hook that never ran (exec failed): a failure, with the reason as stderr."""
    return HookResult(hook=hook, returncode=None, timed_out=False, stderr=str(err), stdout="")


_Done = Callable[[HookResult], None]
_Job = tuple[Path, bytes, Mapping[str, str] | None, "Future[HookResult]", _Done | None]


class HookRunner:
    """Runs every hook on every decision, on background threads, never blocking the caller.

    Args:
        hooks: executables the user passed with ``--hook`` (checked by :func:`validate_hooks`).
        timeout: seconds a hook may run before its process group is stopped.
        retry_after: seconds before each further run of a hook that failed; its length plus
            one is the number of runs a failing hook gets per decision (used by the caller,
            :class:`lrwatch.daemon.hook_jobs.HookJobs`, which schedules them).

    Example::

        with HookRunner(validate_hooks([Path("hooks/append-to-file")])) as runner:
            futures = runner.notify(record)   # returns at once
    """

    def __init__(
        self,
        hooks: Sequence[Path],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        kill_after: float = KILL_AFTER,
        max_workers: int = MAX_WORKERS,
        max_pending: int = MAX_PENDING,
        retry_after: Sequence[float] = RETRY_AFTER,
    ) -> None:
        if timeout <= 0 or kill_after <= 0:
            raise ConfigError("hook timeout and kill_after must be positive seconds")
        if max_workers < 1 or max_pending < 1:
            raise ConfigError("max_workers and max_pending must be at least 1")
        if any(not delay >= 0 for delay in retry_after):
            raise ConfigError("retry delays must be seconds >= 0")
        self.hooks = tuple(hooks)
        self.timeout = timeout
        self.kill_after = kill_after
        self.retry_after = tuple(retry_after)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._threads: list[threading.Thread] = []
        self._max_workers = max_workers

    def notify(self, record: Mapping[str, Any]) -> list[Future[HookResult]]:
        """Queue ``record`` for every hook and return at once: one future per hook.

        A notification that finds the queue full is dropped with a warning (its future is
        cancelled): the daemon's loop must never wait for a hook.
        """
        if not self.hooks:
            return []
        try:
            payload = (json.dumps(record, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as err:
            logger.warning("decision not sent to hooks: not JSON (%s)", err)
            return []
        futures: list[Future[HookResult]] = []
        for hook in self.hooks:
            future = self.submit(hook, payload)
            if future.cancelled():
                logger.warning(
                    "hook %s: %d notifications already queued; this one is dropped",
                    hook,
                    self._jobs.maxsize,
                )
            futures.append(future)
        return futures

    @property
    def attempts(self) -> int:
        """Runs a failing hook gets per decision, in all."""
        return len(self.retry_after) + 1

    def submit(
        self,
        hook: Path,
        payload: bytes,
        *,
        env: Mapping[str, str] | None = None,
        done: _Done | None = None,
    ) -> Future[HookResult]:
        """Queue one run of ``hook`` with ``payload`` on stdin and return at once.

        ``done`` is called on the worker thread with the result when the run has ended (also
        when it could not start). A full queue cancels the returned future and never calls
        ``done``: the caller keeps the job and submits it again later.
        """
        self._start_workers()
        future: Future[HookResult] = Future()
        try:
            self._jobs.put_nowait((hook, payload, env, future, done))
        except queue.Full:
            future.cancel()
        return future

    def close(self, *, timeout: float | None = None) -> None:
        """Let the queued hooks run, then stop the threads.

        Without ``timeout`` this waits until every queued hook has ended, which is bounded
        because each hook is bounded by its own timeout; with it, at most ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self._threads:
            # After the queued jobs: the workers drain the queue first.
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._jobs.put(None, timeout=remaining)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("hook thread %s still running at shutdown", thread.name)
        self._threads = []

    def __enter__(self) -> HookRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_workers(self) -> None:
        # Started on first use: a daemon without hooks, or without decisions, has no threads.
        while len(self._threads) < self._max_workers:
            thread = threading.Thread(
                target=self._work, name=f"lrwatch-hook-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            hook, payload, env, future, done = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = run_hook(
                    hook, payload, timeout=self.timeout, kill_after=self.kill_after, env=env
                )
            except Exception as err:  # broad: a hook that cannot even start must not end the thread
                logger.warning("hook %s could not run: %s", hook, err)
                self._finish(done, could_not_start(hook, err))
                future.set_exception(err)
                continue
            report_result(result)
            self._finish(done, result)
            future.set_result(result)

    @staticmethod
    def _finish(done: _Done | None, result: HookResult) -> None:
        if done is None:
            return
        try:
            done(result)
        except Exception:  # broad: the caller's bookkeeping failing must not end the thread
            logger.exception("hook %s: recording its result failed", result.hook)
