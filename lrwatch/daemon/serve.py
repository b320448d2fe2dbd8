"""The watch loop of ``lrwatch serve``: wake on file events (or a timer), then process runs.

File events (inotify through watchdog) are wake-up hints, never the source of truth: the handler
only notes which directories were written and sets an event; the loop then asks those runs'
readers for whatever is new, so missed, late or duplicate events are harmless. Behind them, a
full pass over every run catches anything an event could miss, as rarely as its measured cost
allows (:func:`~lrwatch.daemon.pacing.rescan_interval`). With ``--poll`` (network filesystems,
where inotify sees nothing) there are no events: each directory and run is looked at on its own
timer, less often the longer it has been quiet (:class:`~lrwatch.daemon.pacing.QuietSchedule`).
Between wake-ups the loop waits without using CPU. SIGINT/SIGTERM end it with one
:class:`Shutdown` exception that leaves through the observer's ``with`` block.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrwatch import schema
from lrwatch.daemon.bucket import POLL_SECS, follow_mirrors
from lrwatch.daemon.pacing import Coalescer, QuietSchedule, rescan_interval
from lrwatch.daemon.runs import Daemon

if TYPE_CHECKING:
    from lrwatch.objstore.mirror import Mirror

logger = logging.getLogger(__name__)

__all__ = ["Shutdown", "Waker", "serve_forever", "watch"]

FALLBACK_POLL = 1.0  # seconds between passes when inotify cannot be used (e.g. too many watches)
NEW_DIR_RECHECK = 0.5  # seconds after a new directory appeared: one more look at it
# watchdog installs its watches on its own thread after start(): a run written in that moment
# raises no event, so the second full pass comes this soon instead of after a rescan interval.
STARTUP_RESCAN = 1.0

_WRITES = frozenset({"created", "modified", "moved", "closed"})  # watchdog's event_type words


class Shutdown(Exception):
    """SIGINT or SIGTERM arrived: leave the loop (and the observer's ``with``) cleanly."""


class Waker:
    """Turns file events and stop requests into wake-ups of the loop; does no work itself.

    It remembers which directories were written (``take()``), so a pass reads only those runs.
    """

    def __init__(self) -> None:
        self.woken = threading.Event()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # directories with a written event file
        # A new directory's first writes can precede the observer's watch on it (inotify adds
        # it only after the creation event): the loop looks at it again shortly after.
        self._new_dirs: set[str] = set()

    def dispatch(self, event: Any) -> None:
        """watchdog's handler entry point: wake only for written event files and new directories.

        Opens and reads are ignored: the daemon's own reads would otherwise wake it again.
        """
        if event.event_type not in _WRITES:
            return
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        # The daemon's own markers land in <run>/lrwatch_daemon/: they must not wake it.
        paths = [p for p in paths if f"{os.sep}{schema.DAEMON_SUBRUN}" not in p]
        if not paths:
            return
        if event.is_directory and event.event_type == "created":
            with self._lock:
                self._new_dirs.add(paths[-1])
        else:
            written = [p for p in paths if "tfevents" in os.path.basename(p)]
            if not written:
                return
            with self._lock:
                self._dirty.update(os.path.dirname(p) for p in written)
        logger.debug("wake-up: %s %s", event.event_type, paths[-1])
        self.woken.set()

    def take(self) -> tuple[set[str], set[str]]:
        """(written directories, new directories) since the last call."""
        with self._lock:
            out = self._dirty, self._new_dirs
            self._dirty, self._new_dirs = set(), set()
        return out

    def stop(self) -> None:
        self.stopping.set()
        self.woken.set()

    def wait(self, timeout: float, pacer: Coalescer | None = None) -> None:
        """Wait for a hint or ``timeout``, then as ``pacer`` says; raise Shutdown when asked."""
        if self.woken.wait(timeout) and pacer is not None:
            pause = pacer.delay(time.monotonic())
            if pause > 0:
                self.stopping.wait(pause)  # a stop-aware pause, not a sleep: it ends on stop()
        self.woken.clear()  # before the pass: a write during the pass wakes the next one
        if self.stopping.is_set():
            raise Shutdown


def watch(
    daemon: Daemon, *, waker: Waker, poll: float | None = None, mirrors: Sequence[Mirror] = ()
) -> None:
    """Process the daemon's runs on every wake-up until ``waker.stop()``; raises Shutdown then.

    With ``poll`` (seconds) there is no file watching at all, only timed looks, which is what
    works on network filesystems; without it, watchdog's inotify observer supplies the hints.
    With ``mirrors`` (object storage) the daemon's logdirs are their local copies, and a timed
    loop keeps them in step (:mod:`.bucket`).
    """
    if mirrors:
        wait = functools.partial(waker.wait, pacer=None)
        follow_mirrors(daemon, mirrors, wait=wait, poll=poll or POLL_SECS)
        return
    if poll is None:
        observer = _observer(daemon.logdirs, waker)
        if observer is not None:
            with observer:
                _follow_events(daemon, waker)
        poll = FALLBACK_POLL
    _follow_timers(daemon, waker, poll)


def _first_pass(daemon: Daemon) -> None:
    """Read every run once, and say when that is done (what was there is judged from then on)."""
    start = time.monotonic()
    taken = daemon.process()
    logger.info(
        "caught up with %d runs in %.1f s (%d decisions)",
        len(daemon.runs),
        time.monotonic() - start,
        sum(map(len, taken.values())),
    )


def _follow_events(daemon: Daemon, waker: Waker) -> None:
    """The inotify loop: each pass reads the runs the events named; full passes are rare."""
    pacer = Coalescer()
    rescan_at = time.monotonic() + STARTUP_RESCAN
    recheck: list[tuple[float, set[str]]] = []  # (when, new directories to look at again)
    _first_pass(daemon)
    while True:
        deadline = min([rescan_at, daemon.next_save(), *(when for when, _ in recheck[:1])])
        waker.wait(max(deadline - time.monotonic(), 0.0), pacer)
        dirty, new_dirs = waker.take()
        start, cpu = time.monotonic(), time.thread_time()
        if new_dirs:
            recheck.append((start + NEW_DIR_RECHECK, new_dirs))
        while recheck and recheck[0][0] <= start:
            dirty |= recheck.pop(0)[1]
        if start >= rescan_at:
            daemon.process()
            cost = time.thread_time() - cpu
            rescan_at = time.monotonic() + rescan_interval(cost)
            logger.debug(
                "full pass over %d runs: %.2f ms of CPU; the next in %.0f s",
                len(daemon.runs),
                1000 * cost,
                rescan_at - time.monotonic(),
            )
        else:
            daemon.process(dirty | new_dirs)
        pacer.passed(start, time.monotonic())


def _follow_timers(daemon: Daemon, waker: Waker, poll: float) -> None:
    """The polling loop: every run and directory on its own timer, quiet ones less often.

    A run is looked at with ``stat`` calls only (its directory and its event files); it is read
    only when they changed. Directories that are not runs are looked at for new runs.
    """
    dirs, runs = QuietSchedule(poll=poll), QuietSchedule(poll=poll)
    finder = daemon.finder
    _first_pass(daemon)
    for run_dir in daemon.runs:
        runs.plan_at(os.fspath(run_dir), time.monotonic() + poll)
    while True:
        now, wall = time.monotonic(), time.time()
        for d in dirs.due(now):
            if d not in daemon.named:  # a run's directory is looked at with the run
                finder.check(d)
                if d in finder:
                    dirs.plan(d, now=now, age=wall - finder.modified(d))
        for d in finder.take_new_dirs():
            if d not in daemon.named and d in finder:
                dirs.plan(d, now=now, age=wall - finder.modified(d))
        for run_dir in daemon.adopt(finder.take_new_runs()):
            dirs.forget(os.fspath(run_dir))
            runs.plan_at(os.fspath(run_dir), now)
        due = [(d, daemon.named.get(d)) for d in runs.due(now)]
        news = [d for d, run in due if run is not None and run.reader.has_news()]
        for d in news:
            finder.check(d)  # new files, or runs in new subdirectories
        daemon.process_runs(map(Path, news))
        for d, _ in due:
            run = daemon.named.get(d)
            if run is not None:
                age = wall - max(run.reader.modified, finder.modified(d))
                runs.plan(d, now=now, age=age)
            elif d in finder:  # dropped after a failure: found again through its directory
                dirs.plan_at(d, now + poll)
        # One pass per poll interval at most, for everything due by then: a look happens at
        # most `poll` after its plan, and the loop wakes once, not once per key.
        wake = min(dirs.next_due(), runs.next_due(), daemon.next_save(), now + dirs.max_interval)
        wake = max(wake, now + poll)
        waker.wait(max(wake - time.monotonic(), 0.0))


def _observer(logdirs: Sequence[Path], waker: Waker) -> Any:
    """A started watchdog observer on ``logdirs``, or None (after a warning) if inotify fails."""
    from watchdog.events import DirCreatedEvent, FileModifiedEvent
    from watchdog.observers import Observer

    observer = Observer()
    try:
        for logdir in logdirs:
            # Writes only. Subscribing to renames would stall every later event by 0.5 s: watchdog
            # holds each IN_MOVED_FROM that long to pair it, and the daemon's own atomic state and
            # control-file writes are renames. New directories wake it too (see Waker).
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
        return None
    return observer


def serve_forever(
    daemon: Daemon, *, poll: float | None = None, mirrors: Sequence[Mirror] = ()
) -> None:
    """:func:`watch` with SIGINT/SIGTERM as a clean stop; a second signal stops at once."""
    waker = Waker()

    def on_signal(signum: int, frame: Any) -> None:
        if waker.stopping.is_set():
            raise Shutdown  # the user insists: leave now, from wherever the loop is
        logger.info("signal %d: shutting down", signum)
        waker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        watch(daemon, waker=waker, poll=poll, mirrors=mirrors)
    except Shutdown:
        logger.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
