"""The daemon: wake on file events, then :func:`~lrwatch.daemon.watched_run.run_once` on every run.

File events (inotify through watchdog) are wake-up hints, never the source of truth: the handler
only sets an event, and the loop then asks every run's reader for whatever is new, so missed,
late or duplicate events are harmless. The loop also wakes on its own every ``RESCAN_SECONDS``
(or every ``--poll`` seconds, for network filesystems where inotify sees nothing), and waits in
between without using CPU. New runs are found on every pass. SIGINT/SIGTERM end the loop with
one :class:`Shutdown` exception that leaves through the observer's ``with`` block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lrwatch import schema
from lrwatch.daemon.hook_jobs import HookJobs
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import Mode
from lrwatch.daemon.rails import Rails
from lrwatch.daemon.tally import Tally
from lrwatch.daemon.watched_run import Analyzer, WatchedRun, run_once
from lrwatch.errors import RunGone
from lrwatch.events.reader import find_runs
from lrwatch.schema import Decision

logger = logging.getLogger(__name__)

__all__ = ["Daemon", "Shutdown", "Waker", "run_once", "serve_forever", "watch"]


class Daemon:
    """The runs under some log directories, each with its reader, analyzer and outputs.

    Example::

        daemon = Daemon([Path("runs")], mode="apply", analyzer_factory=RunAnalyzer)
        daemon.process()   # discover runs, run_once on each
        daemon.close()
    """

    def __init__(
        self,
        logdirs: Sequence[Path],
        *,
        mode: Mode,
        analyzer_factory: Callable[[], Analyzer],
        rails: Rails | None = None,
        hooks: HookRunner | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.logdirs = tuple(Path(d) for d in logdirs)
        self.tally = tally
        self.mode: Mode = mode
        self.rails = rails or Rails()
        self.hooks = hooks
        self._analyzer_factory = analyzer_factory
        self.runs: dict[Path, WatchedRun] = {}
        # Hook runs of a run forgotten after a failed pass: the rebuilt run takes them over, so
        # a hook still running is not started again (the audit log does not say it ended yet).
        self._hook_jobs: dict[Path, HookJobs] = {}

    def discover(self) -> None:
        """Add every run that appeared under the logdirs since the last call."""
        for logdir in self.logdirs:
            try:
                found = find_runs(logdir)
            except RunGone as err:
                logger.warning("%s", err)
                continue
            for run_dir in found:
                if run_dir not in self.runs:
                    logger.info("watching run %s", run_dir)
                    _ensure_layout(run_dir)
                    run = WatchedRun(
                        run_dir,
                        analyzer_factory=self._analyzer_factory,
                        mode=self.mode,
                        hook_jobs=self._hook_jobs.pop(run_dir, None),
                    )
                    run.tally = self.tally
                    self.runs[run_dir] = run

    def process(self) -> dict[Path, list[Decision]]:
        """Discover runs, then :func:`run_once` on each; returns the decisions taken, by run."""
        self.discover()
        taken: dict[Path, list[Decision]] = {}
        for run_dir, run in list(self.runs.items()):
            try:
                decisions = run_once(run, rails=self.rails, hooks=self.hooks)
            except RunGone:
                logger.info("run %s is gone; no longer watching it", run_dir)
                run.close()
                del self.runs[run_dir]
                continue
            except Exception:  # broad: one run's bad data must not blind the daemon to the rest
                logger.exception("%s: processing failed; will retry on the next wake-up", run_dir)
                # The failed pass consumed records in memory only: forget the run, so the next
                # pass rebuilds it from its saved state and reads (and decides) them again.
                run.close()
                del self.runs[run_dir]
                self._hook_jobs[run_dir] = run.hook_jobs
                continue
            if decisions:
                taken[run_dir] = decisions
        if self.tally is not None:
            self.tally.maybe_summarize(runs=len(self.runs))
        return taken

    def close(self) -> None:
        for run in self.runs.values():
            run.close()


# ------------------------------------------------------------------------------ the watch loop
RESCAN_SECONDS = 30.0  # with inotify, a full pass this often anyway: events are only hints
FALLBACK_POLL = 1.0  # seconds between passes when inotify cannot be used (e.g. too many watches)
NEW_DIR_RECHECK = 0.5  # seconds after a new directory appeared: one more pass
# watchdog installs its watches on its own thread after start(): a run written in that moment
# raises no event, so the second pass comes this soon instead of after RESCAN_SECONDS.
STARTUP_RESCAN = 1.0
MIN_INTERVAL = 0.02  # seconds: a trainer flushing in bursts wakes us once per burst, not per write


_WRITES = frozenset({"created", "modified", "moved", "closed"})  # watchdog's event_type words


class Shutdown(Exception):
    """SIGINT or SIGTERM arrived: leave the loop (and the observer's ``with``) cleanly."""


class Waker:
    """Turns file events and stop requests into wake-ups of the loop; does no work itself."""

    def __init__(self) -> None:
        self.woken = threading.Event()
        self.stopping = threading.Event()
        # A new directory's first writes can precede the observer's watch on it (inotify adds
        # it only after the creation event): the loop looks again shortly after one appears.
        self.new_dir = threading.Event()

    def dispatch(self, event: Any) -> None:
        """watchdog's handler entry point: wake only for written event files and new directories.

        Opens and reads are ignored: the daemon's own reads would otherwise wake it again.
        """
        if event.event_type not in _WRITES:
            return
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        # The daemon's own markers land in <run>/lrwatch_daemon/: they must not wake it.
        paths = [p for p in paths if f"{os.sep}{schema.DAEMON_SUBRUN}" not in p]
        is_new_dir = event.is_directory and event.event_type == "created" and paths
        if is_new_dir:
            self.new_dir.set()
        if is_new_dir or any("tfevents" in os.path.basename(p) for p in paths):
            logger.debug("wake-up: %s %s", event.event_type, paths[0])
            self.woken.set()

    def stop(self) -> None:
        self.stopping.set()
        self.woken.set()

    def wait(self, timeout: float) -> None:
        """Wait for a hint or ``timeout``, then let a burst settle; raise Shutdown when asked."""
        self.woken.wait(timeout)
        self.stopping.wait(MIN_INTERVAL)  # a stop-aware pause, not a sleep: it ends on stop()
        self.woken.clear()  # before the pass: a write during the pass wakes the next one
        if self.stopping.is_set():
            raise Shutdown


def watch(daemon: Daemon, *, waker: Waker, poll: float | None = None) -> None:
    """Run ``daemon.process()`` on every wake-up until ``waker.stop()``; raises Shutdown then.

    With ``poll`` (seconds) there is no file watching at all, only timed passes, which is what
    works on network filesystems; without it, watchdog's inotify observer supplies the hints.
    """
    observer: Any = contextlib.nullcontext()
    interval = poll if poll is not None else RESCAN_SECONDS
    if poll is None:
        observer, interval = _observer(daemon.logdirs, waker)
    with observer:
        wait = min(interval, STARTUP_RESCAN)
        while True:
            daemon.process()
            if waker.new_dir.is_set():
                waker.new_dir.clear()
                waker.stopping.wait(NEW_DIR_RECHECK)
                waker.woken.set()  # one more pass for writes the new watch may have missed
            waker.wait(wait)
            wait = interval


def _observer(logdirs: Sequence[Path], waker: Waker) -> tuple[Any, float]:
    from watchdog.events import DirCreatedEvent, FileModifiedEvent
    from watchdog.observers import Observer

    observer = Observer()
    try:
        for logdir in logdirs:
            # Writes only. Subscribing to renames would stall every later event by 0.5 s: watchdog
            # holds each IN_MOVED_FROM that long to pair it, and the daemon's own atomic state and
            # control-file writes are renames. New directories wake it too (see Waker.new_dir).
            observer.schedule(
                waker,  # type: ignore[arg-type]
                str(logdir),
                recursive=True,
                event_filter=[FileModifiedEvent, DirCreatedEvent],
            )
        observer.start()
    except OSError as err:
        logger.warning(
            "file watching unavailable (%s); polling every %s s (see --poll)", err, FALLBACK_POLL
        )
        return contextlib.nullcontext(), FALLBACK_POLL
    return observer, RESCAN_SECONDS


def serve_forever(daemon: Daemon, *, poll: float | None = None) -> None:
    """:func:`watch` with SIGINT/SIGTERM as a clean stop; a second signal stops at once."""
    waker = Waker()

    def on_signal(signum: int, frame: Any) -> None:
        if waker.stopping.is_set():
            raise Shutdown  # the user insists: leave now, from wherever the loop is
        logger.info("signal %d: shutting down", signum)
        waker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        watch(daemon, waker=waker, poll=poll)
    except Shutdown:
        logger.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ensure_layout(run_dir: Path) -> None:
    """Give a newly watched run TensorBoard's Custom Scalars tab, once (see tb_layout)."""
    from lrwatch.daemon import tb_layout

    subrun = run_dir / schema.DAEMON_SUBRUN
    if any(subrun.glob(f"*{tb_layout.FILE_SUFFIX}")):
        return
    try:
        tb_layout.write_layout(run_dir)
    except OSError as err:  # a read-only run still gets watched and advised
        logger.warning("cannot write the TensorBoard layout into %s: %s", subrun, err)
