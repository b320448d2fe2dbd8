"""The runs under some log directories, each with its reader, analyzer and outputs.

:class:`Daemon` is what ``lrwatch serve`` holds: it finds runs (:mod:`.discovery`), keeps one
:class:`~lrwatch.daemon.watched_run.WatchedRun` each, and calls
:func:`~lrwatch.daemon.watched_run.run_once` on the ones a pass names. The watch loop that
decides which runs a pass names, and when, is :mod:`.serve`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from lrwatch import schema
from lrwatch.daemon.discovery import RunFinder
from lrwatch.daemon.hook_jobs import HookJobs
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import Mode
from lrwatch.daemon.rails import Rails
from lrwatch.daemon.tally import Tally
from lrwatch.daemon.watched_run import Analyzer, WatchedRun, run_once
from lrwatch.errors import RunGone
from lrwatch.schema import Decision

logger = logging.getLogger(__name__)

# A run's state is saved at most this long after a change that decided nothing, or longer with
# many runs, so that at most MAX_SAVES states are written per second: a killed daemon then reads
# up to that much of each run again (cheap), where saving every pass cost a rename per flush.
SAVE_SECS = 5.0
MAX_SAVES = 50.0
SAVES_PER_PASS = 10  # a pass never stalls on a backlog of saves: the rest wait for the next


class Daemon:
    """The runs under some log directories, each with its reader, analyzer and outputs.

    Example::

        daemon = Daemon([Path("runs")], mode="apply", analyzer_factory=RunAnalyzer)
        daemon.process()                 # discover runs, run_once on each
        daemon.process(["runs/exp1"])    # only what a file event named (and what waits)
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
        # Hook runs of a run forgotten after a failed pass: the rebuilt run takes them over, so
        # a hook still running is not started again (the audit log does not say it ended yet).
        self._hook_jobs: dict[Path, HookJobs] = {}
        self.mode: Mode = mode
        self.rails = rails or Rails()
        self.hooks = hooks
        self.finder = RunFinder(self.logdirs)
        self._analyzer_factory = analyzer_factory
        self.runs: dict[Path, WatchedRun] = {}
        self.named: dict[str, WatchedRun] = {}  # the same by os.fspath: no Path per lookup
        # Runs with outputs a full disk refused: in every pass until they went out.
        self._waiting: set[Path] = set()
        # Runs whose state changed without a decision, by when: saved within SAVE_SECS.
        self._unsaved: dict[Path, float] = {}
        self._saved_at = time.monotonic()  # the last save_states call

    def discover(self, dirs: Iterable[str] | None = None) -> list[Path]:
        """Look for new runs (under ``dirs`` only, if given); returns the runs added."""
        if dirs is None:
            for missing in self.finder.check_all():
                logger.warning("log directory %s does not exist", missing)
        else:
            for d in dirs:
                self.finder.check(d)
        return self.adopt(self.finder.take_new_runs())

    def adopt(self, found: Iterable[str]) -> list[Path]:
        """Start watching the run directories ``found`` (those not watched yet)."""
        added = []
        for run_dir in map(Path, sorted(found)):
            if run_dir in self.runs:
                continue
            logger.info("watching run %s", run_dir)
            _ensure_layout(run_dir)
            run = WatchedRun(
                run_dir,
                analyzer_factory=self._analyzer_factory,
                mode=self.mode,
                hook_jobs=self._hook_jobs.pop(run_dir, None),
            )
            run.tally = self.tally
            self.runs[run_dir] = self.named[os.fspath(run_dir)] = run
            added.append(run_dir)
        return added

    def process(self, dirs: Iterable[str] | None = None) -> dict[Path, list[Decision]]:
        """Discover runs, then :func:`run_once` on each; returns the decisions taken, by run.

        With ``dirs`` (directories a file event named), only the runs among them, the runs
        found under them, and the runs with outputs waiting are processed.
        """
        if dirs is None:
            fresh = set(self.discover())
            # stat calls first: a full pass over 10,000 quiet runs then costs ~10 us a run
            news = [p for p, run in self.runs.items() if p in fresh or run.reader.has_news()]
            return self.process_runs(news)
        dirs = set(dirs)
        added = self.discover(dirs)
        return self.process_runs([*(Path(d) for d in dirs), *added])

    def process_runs(self, run_dirs: Iterable[Path]) -> dict[Path, list[Decision]]:
        """:func:`run_once` on the watched runs among ``run_dirs``, and on every run waiting."""
        taken: dict[Path, list[Decision]] = {}
        for run_dir in dict.fromkeys([*run_dirs, *sorted(self._waiting)]):
            run = self.runs.get(run_dir)
            if run is None:
                continue
            try:
                decisions = run_once(run, rails=self.rails, hooks=self.hooks, defer_save=True)
            except RunGone:
                logger.info("run %s is gone; no longer watching it", run_dir)
                self._drop(run_dir)
                continue
            except Exception:  # broad: one run's bad data must not blind the daemon to the rest
                logger.exception("%s: processing failed; will retry on the next wake-up", run_dir)
                # The failed pass consumed records in memory only: forget the run, so the next
                # pass rebuilds it from its saved state and reads (and decides) them again.
                self._hook_jobs[run_dir] = run.hook_jobs
                self._drop(run_dir)
                self.finder.forget_run(os.fspath(run_dir))
                continue
            if run.outbox or run.unacked or not run.hook_jobs.idle:  # hook runs owed: retried
                self._waiting.add(run_dir)
            else:
                self._waiting.discard(run_dir)
            if run.dirty:
                self._unsaved.setdefault(run_dir, time.monotonic())
            if decisions:
                taken[run_dir] = decisions
        self.save_states()
        if self.tally is not None:
            self.tally.maybe_summarize(runs=len(self.runs))
        return taken

    @property
    def save_after(self) -> float:
        """Seconds a changed state may wait to be saved: SAVE_SECS, more with many runs."""
        return max(SAVE_SECS, len(self.runs) / MAX_SAVES)

    def next_save(self) -> float:
        """When (``time.monotonic()``) :meth:`save_states` next has a state to save; inf if none."""
        return next(iter(self._unsaved.values()), math.inf) + self.save_after

    def save_states(self, *, everything: bool = False) -> None:
        """Save the state of runs changed :attr:`save_after` ago or more (``everything``: all).

        Writing ``state.json`` on every pass was ~90% of the daemon's work per appended step
        (a rename per run per flush; ``bench/fleet.py``); its only reader is a restarted daemon.
        """
        now = time.monotonic()
        deadline = math.inf if everything else now - self.save_after
        # MAX_SAVES a second since the last call, but SAVES_PER_PASS at least
        budget = math.inf if everything else max(SAVES_PER_PASS, MAX_SAVES * (now - self._saved_at))
        self._saved_at = now
        for run_dir, since in list(self._unsaved.items()):
            if since > deadline or budget <= 0:
                break  # in order of first change: the rest are younger, or wait a pass
            budget -= 1
            del self._unsaved[run_dir]
            run = self.runs.get(run_dir)
            if run is None or not run.dirty or run.outbox or run.unacked:
                continue  # gone, saved by run_once, or saved once what waits went out
            run.dirty = not run.save()
            if run.dirty:  # a full disk: try again later
                self._unsaved[run_dir] = time.monotonic()

    def _drop(self, run_dir: Path) -> None:
        self.named.pop(os.fspath(run_dir), None)
        self._unsaved.pop(run_dir, None)
        self.runs.pop(run_dir).close()
        self._waiting.discard(run_dir)

    def close(self) -> None:
        self.save_states(everything=True)
        for run in self.runs.values():
            run.close()


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
