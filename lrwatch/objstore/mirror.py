"""The daemon's side of object storage: a local mirror of the runs under a URL.

``lrwatch serve s3://bucket/runs`` runs the daemon unchanged on a local directory, the mirror
(``<state-dir>/serve/s3/bucket/runs``), which :class:`Mirror` keeps in step with the bucket:

- :meth:`Mirror.pull`, every ``--poll`` seconds: one recursive listing (one request per 1,000
  objects on S3; object stores have no file events); event files come down by ranged reads of
  only their new bytes, segments concatenated back into the trainer's file
  (:mod:`.segments`); the hook's applied record whole when it changed;
- :meth:`Mirror.push`, after each pass: a control file the daemon changed goes up at once with
  one PUT (atomic: the hook sees the old object or the new one); the audit log and the
  TensorBoard markers of ``lrwatch_daemon/`` whole, at most every ``PUSH_SECS`` per run, and
  on the way out, so TensorBoard and ``lrwatch status`` on the bucket show the decisions.

The daemon's state (``lrwatch_daemon/state.json``) stays in the mirror only. A daemon started
with an empty state directory takes each run's control file and audit log from the bucket the
first time it sees the run, so it neither reissues action ids nor repeats decision lines.

``outputs="pull"`` is the read-only copy of ``lrwatch status`` and ``lrwatch analyze``
(``<state-dir>/view/...``): event files, control files, applied records and audit logs come
down (nothing else: a checkpoint beside a run is not a run's business), nothing goes up.

A failed listing, read or write is one warning per kind; the next pass tries again, and the
mirror is never left with a partial copy of a record it cannot finish (the readers wait for
the rest of a record, as they do for a trainer still writing).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Literal

from lrwatch.errors import ConfigError
from lrwatch.objstore.location import local_copy
from lrwatch.objstore.segments import split_segment
from lrwatch.objstore.store import Store
from lrwatch.schema import APPLIED_FILENAME, AUDIT_FILENAME, CONTROL_FILENAME, DAEMON_SUBRUN

logger = logging.getLogger(__name__)

PUSH_SECS = 10.0  # audit log and markers of one run: re-uploaded whole at most this often
_LOCK = ".lrwatch_mirror.lock"
_HISTORY = (CONTROL_FILENAME, AUDIT_FILENAME)  # the daemon's outputs an earlier daemon left


class Mirror:
    """A local copy of the runs under ``url``, kept in step by :meth:`pull` and :meth:`push`.

    Args:
        url: ``s3://bucket/prefix`` (any fsspec URL).
        state_dir: where mirrors live; this one is ``state_dir/serve/<scheme>/<bucket>/<prefix>``
            (``view/...`` with ``outputs="pull"``).
        outputs: ``"push"`` for ``serve`` (the daemon's outputs go up), ``"pull"`` for a
            read-only view (everything comes down).

    Example::

        mirror = Mirror("s3://bucket/runs", Path("~/.local/state/lrwatch"))
        daemon = Daemon([mirror.local], ...)
        changed = mirror.pull(); daemon.process(); mirror.push()
    """

    def __init__(
        self, url: str, state_dir: Path, *, outputs: Literal["push", "pull"] = "push"
    ) -> None:
        self.url, self.outputs = url.rstrip("/"), outputs
        self.local = local_copy(Path(state_dir) / ("serve" if outputs == "push" else "view"), url)
        self.store = Store(url)
        self.local.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.local / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:  # one serve per mirror; views wait for each other
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if outputs == "push" else 0))
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"another lrwatch serve mirrors {url} into {self.local} (use another --state-dir)"
            ) from None
        self.runs: set[str] = set()  # run directories (keys relative to the URL) seen so far
        self._sigs: dict[str, tuple[int, str]] = {}  # whole files: the listing's (size, tag)
        self._pushed: dict[str, tuple[int, int]] = {}  # local file -> (mtime_ns, size) sent
        self._push_at: dict[str, float] = {}
        self._warned: set[str] = set()

    def close(self) -> None:
        """Release the mirror (call :meth:`push` with ``everything=True`` first)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ---------------------------------------------------------------- down
    def pull(self) -> set[Path]:
        """Bring down what is new; the local run directories whose event files grew."""
        try:
            listing = self.store.listing()
        except Exception as err:  # noqa: BLE001  network, credentials: warn, retry next pass
            self._warn("listing", err)
            return set()
        segments: dict[str, list[tuple[int, str, int]]] = {}
        grown: set[Path] = set()
        for key, (size, tag) in sorted(listing.items()):
            run, _, name = key.rpartition("/")
            ours = f"/{DAEMON_SUBRUN}/" in f"/{key}"
            if "tfevents" in name and not (ours and self.outputs == "push"):
                local_name, index = split_segment(name) or (name, -1)
                segments.setdefault(f"{run}/{local_name}" if run else local_name, []).append(
                    (index, key, size)
                )
                if not ours:
                    self._first_sight(run, listing)
            elif name == APPLIED_FILENAME or (self.outputs == "pull" and name in _HISTORY):
                self._pull_whole(key, size, tag)
        for path, parts in segments.items():
            if self._attempt(f"reading {path}", self._pull_events, self.local / path, parts):
                grown.add((self.local / path).parent)
        return grown

    def _first_sight(self, run: str, listing: dict[str, tuple[int, str]]) -> None:
        """A run new to this daemon: adopt the control file and audit log a daemon left."""
        if run in self.runs:
            return
        self.runs.add(run)
        if self.outputs != "push":
            return
        for name in _HISTORY:
            key = f"{run}/{name}" if run else name
            local = self.local / key
            if key in listing and not local.exists():
                self._pull_whole(key, *listing[key])
            if local.exists():  # it came from the bucket (or is ours): nothing to send
                st = local.stat()
                self._pushed[key] = (st.st_mtime_ns, st.st_size)

    def _pull_whole(self, key: str, size: int, tag: str) -> None:
        if self._sigs.get(key) == (size, tag):
            return
        try:
            data = self.store.get(key)
        except Exception as err:  # noqa: BLE001  network, credentials: warn, retry next pass
            self._warn(f"reading {key}", err)
            return
        if data is None:  # deleted since the listing
            return
        path = self.local / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.mirror")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._sigs[key] = (size, tag)

    def _pull_events(self, path: Path, parts: list[tuple[int, str, int]]) -> bool:
        """Append the new bytes of one event file (its segments in order); True if it grew."""
        have = path.stat().st_size if path.exists() else 0
        before = have
        if len(parts) == 1 and parts[0][0] < 0 and parts[0][2] < have:
            have = 0  # a plain file that shrank: replaced, read it again (the reader warns)
            path.unlink()
        start = 0
        for _, key, size in sorted(parts):
            end = start + size
            if have < end:
                if have < start:
                    break  # an earlier segment came short: the next pull goes on from there
                data = self.store.get(key, start=have - start) or b""
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab") as f:
                    f.write(data)
                have += len(data)
            start = end
        return have != before

    # ---------------------------------------------------------------- up
    def push(self, *, everything: bool = False) -> None:
        """Send what the daemon wrote: control files at once, the rest at most every
        ``PUSH_SECS`` per run (``everything``: all of it now, as on the way out)."""
        if self.outputs != "push":
            return
        now = time.monotonic()
        for run in sorted(self.runs):
            prefix = f"{run}/" if run else ""
            self._push_file(prefix + CONTROL_FILENAME)
            if not everything and now < self._push_at.get(run, 0.0):
                continue
            keys = [prefix + AUDIT_FILENAME]
            markers = self.local / prefix / DAEMON_SUBRUN
            keys += [
                f"{prefix}{DAEMON_SUBRUN}/{p.name}" for p in sorted(markers.glob("*tfevents*"))
            ]
            if any([self._push_file(key) for key in keys]):
                self._push_at[run] = now + PUSH_SECS

    def _push_file(self, key: str) -> bool:
        """PUT the local file ``key`` if it changed since it was last sent; True if it was."""
        try:
            st = (self.local / key).stat()
        except FileNotFoundError:
            return False
        sig = (st.st_mtime_ns, st.st_size)
        if self._pushed.get(key) == sig:
            return False
        data = (self.local / key).read_bytes()
        if self._attempt(f"writing {key}", self.store.put, key, data) is None:
            return False
        self._pushed[key] = sig
        return True

    # ---------------------------------------------------------------- failures
    def _attempt(self, what: str, fn: object, *args: object) -> object:
        """``fn(*args)``, or None after one warning per kind (retried on the next pass)."""
        try:
            out = fn(*args)  # type: ignore[operator]
        except Exception as err:  # noqa: BLE001  network, credentials, a missing bucket
            self._warn(what, err)
            return None
        return True if out is None else out

    def _warn(self, what: str, err: Exception) -> None:
        key = f"{what.split()[0]}: {type(err).__name__}"
        log = logger.debug if key in self._warned else logger.warning
        self._warned.add(key)
        log("%s: %s failed (%s); retried on the next pass", self.url, what, err)


def local_view(url: str, state_dir: Path) -> Path:
    """Bring the runs under ``url`` down once (for ``status``, ``analyze``); their local copy."""
    mirror = Mirror(url, state_dir, outputs="pull")
    try:
        mirror.pull()
    finally:
        mirror.close()
    return mirror.local
