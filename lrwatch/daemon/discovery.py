"""Finding runs under the log directories again and again, at one ``stat`` per directory.

A run is a directory holding event files (:func:`lrwatch.events.reader.find_runs` is the one-off
version). The daemon looks for new runs on every pass, and with thousands of runs a fresh
``os.walk`` each time lists every directory: ~35 us per run. :class:`RunFinder` remembers every
directory with its mtime instead. Creating, removing or renaming an entry changes the mtime of
the directory holding it, so a directory is listed again only when its mtime moved, or moved
in the last ``RECENT_S`` seconds (two changes within the filesystem's timestamp granularity
can leave it equal). Appending to a file changes no directory: that is the readers' business.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lrwatch.schema import DAEMON_SUBRUN

logger = logging.getLogger(__name__)

RECENT_S = 2.0  # a directory changed this recently is listed again on every look


@dataclass
class _Dir:
    mtime_ns: int = -1  # at the last listing
    mtime: float = 0.0  # the same, in seconds since the epoch (the schedule's age)
    subdirs: frozenset[str] = frozenset()
    is_run: bool = False


class RunFinder:
    """The run directories under ``logdirs``, kept up to date by :meth:`check`, :meth:`check_all`.

    Example::

        finder = RunFinder([Path("runs")])
        finder.check_all()           # lists every directory once
        finder.runs                  # {"runs/exp1", ...}
        finder.check("runs/exp2")    # one new directory (a file event said so)
    """

    def __init__(self, logdirs: Sequence[Path]) -> None:
        self.logdirs = tuple(os.fspath(d) for d in logdirs)
        self._dirs: dict[str, _Dir] = {}
        self._new_runs: list[str] = []  # became runs since the last take_new_runs()
        self._new_dirs: list[str] = []  # first seen since the last take_new_dirs()

    @property
    def runs(self) -> set[str]:
        return {path for path, d in self._dirs.items() if d.is_run}

    def __contains__(self, path: object) -> bool:
        return path in self._dirs

    def modified(self, path: str) -> float:
        """Seconds since the epoch when ``path`` was last seen changed (0 if unknown)."""
        d = self._dirs.get(path)
        return 0.0 if d is None else d.mtime

    def take_new_runs(self) -> list[str]:
        """Directories that became runs (got their first event file) since the last call."""
        out, self._new_runs = self._new_runs, []
        return out

    def take_new_dirs(self) -> list[str]:
        """Directories first seen since the last call."""
        out, self._new_dirs = self._new_dirs, []
        return out

    def forget_run(self, path: str) -> None:
        """Find ``path`` again as a new run at its next look (the daemon dropped it)."""
        node = self._dirs.get(path)
        if node is not None:
            node.mtime_ns, node.is_run = -1, False

    def check_all(self) -> list[str]:
        """Look at every directory known, and at the logdirs; returns the missing logdirs."""
        missing = [d for d in self.logdirs if not os.path.isdir(d)]
        for path in [*self.logdirs, *self._dirs]:
            self.check(path)
        return missing

    def check(self, path: str) -> bool:
        """Look at one directory (and at its new subdirectories); True if it changed.

        A directory that vanished is forgotten with everything below it.
        """
        node = self._dirs.get(path)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            if node is not None:
                self._forget(path)
            return node is not None
        if node is not None and st.st_mtime_ns == node.mtime_ns:
            if time.time() - st.st_mtime >= RECENT_S:
                return False
        if node is None:
            node = self._dirs[path] = _Dir()
            self._new_dirs.append(path)
        self._list(path, node, st)
        return True

    def _list(self, path: str, node: _Dir, st: os.stat_result) -> None:
        subdirs, has_events = set(), False
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name == DAEMON_SUBRUN:  # the daemon's own markers are not a run
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.add(entry.path)
                    elif "tfevents" in entry.name:
                        has_events = has_events or entry.is_file()
        except OSError as err:
            logger.debug("cannot list %s: %s", path, err)
            return
        if has_events and not node.is_run:
            logger.debug("run found: %s", path)
            self._new_runs.append(path)
        node.mtime_ns, node.mtime, node.is_run = st.st_mtime_ns, st.st_mtime, has_events
        for gone in node.subdirs - subdirs:
            self._forget(gone)
        new = subdirs - node.subdirs
        node.subdirs = frozenset(subdirs)
        for sub in sorted(new):
            self.check(sub)

    def _forget(self, path: str) -> None:
        node = self._dirs.pop(path, None)
        if node is None:
            return
        for sub in node.subdirs:
            self._forget(sub)
