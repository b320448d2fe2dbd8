"""The hook's side of an object-store logdir: the spool goes up, the control file comes down.

The training thread never touches the network. It writes the spool directory as it would any
local run directory; :class:`Uploader` runs on its own thread (``lrwatch-upload-...``):

- **event files** go up as segments (:mod:`.segments`) after each write of the event writer,
  at most every ``put_secs`` (the monitor's ``flush_secs``, 0.25 s at least), and within
  ``URGENT_SECS`` after a flush the hook asked for (an alarm-level step, an acknowledgement,
  the end of the run);
- **the control file** comes down every ``CONTROL_SECS`` (every ``ALERT_CONTROL_SECS`` for
  ``ALERT_SECS`` after an urgent upload, when a decision is likely) and replaces the spool's copy
  atomically, so the hook's own controller reads it exactly as it reads a local one (same
  checks, same ``ControlFileError`` warnings);
- **the applied-actions record** goes up when it changed; the bucket's copy comes down once
  at start (``REMOTE_APPLIED``), so a run resumed on another host neither reapplies nor loses.

A failure (no network, no credentials, no such bucket, fsspec missing) is one warning per kind;
the spool keeps everything and the next attempt, ``RETRY_SECS`` later, resumes where the last
one stopped. What was uploaded is recorded in the spool (``.lrwatch_upload.json``), so a
process resumed on the same host uploads what an earlier one could not.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from lrwatch.control import MAX_CONTROL_BYTES
from lrwatch.objstore.segments import SEGMENT_BYTES, segment_name, whole_records
from lrwatch.schema import APPLIED_FILENAME, CONTROL_FILENAME

logger = logging.getLogger(__name__)

MIN_PUT_SECS = 0.25  # regular uploads at most 4 a second, whatever flush_secs says
URGENT_SECS = 0.05  # an alarm, ack or close flush goes up this soon (and no more often)
CONTROL_SECS = 1.0  # one GET of the control object a second: the hook's reaction time floor
# After an urgent upload (an alarm-level step) the answer is likely to come soon: look faster.
ALERT_CONTROL_SECS, ALERT_SECS = 0.2, 5.0
RETRY_SECS = 5.0  # after a failure; the spool keeps everything meanwhile
REMOTE_APPLIED = ".lrwatch_applied.remote.json"  # the bucket's record, as found at start
_STATE = ".lrwatch_upload.json"  # per local event file: [segment index, its start, bytes up]


class Uploader:
    """Copies a spool directory to ``url`` and the control file back, on a background thread.

    Args:
        spool: the local run directory the hook writes (:func:`.location.spool_dir`).
        url: the run's URL, e.g. ``s3://bucket/runs/exp1``.
        put_secs: least time between two regular uploads of new events.
        control: fetch the control file (``watch(control=False)`` reads none).

    Example::

        up = Uploader(spool, "s3://bucket/runs/exp1", put_secs=1.0)
        writer = EventWriter(spool, on_write=up.notify)
        ...
        writer.close(); up.close()
    """

    def __init__(
        self, spool: Path, url: str, *, put_secs: float = 1.0, control: bool = True
    ) -> None:
        self.spool, self.url = Path(spool), url
        self.control = control  # False: the hook applies no control file, none is fetched
        self.put_secs = max(put_secs, MIN_PUT_SECS)
        self.pulled = threading.Event()  # the first look at the bucket is over (or failed)
        self.pending = True  # events or the record not yet (all) uploaded
        self._store: Any = None
        self._sent = _load_sent(self.spool / _STATE)
        self._applied_sig: tuple[int, int] | None = None
        self._control = _read_or_none(self.spool / CONTROL_FILENAME)
        self._wake = threading.Event()
        self._urgent = False
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._failing: set[str] = set()  # what failed last time: say when it works again
        self._thread = threading.Thread(
            target=self._run, name=f"lrwatch-upload-{self.spool.name}", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)  # after the event writer's own (atexit runs in reverse)

    def notify(self, urgent: bool) -> None:
        """The event writer appended to the spool (``urgent``: a flush someone waits on)."""
        if urgent:
            self._urgent = True
            self._wake.set()

    def close(self, timeout: float = 10.0, *, warn: bool = True) -> bool:
        """Upload what is left (one last attempt) and stop; False (and, with ``warn``, one
        warning saying where the rest is) if that did not finish within ``timeout``."""
        atexit.unregister(self.close)
        if not self._thread.is_alive():
            return not self.pending
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        done = not self._thread.is_alive() and not self.pending
        if not done and warn:
            logger.warning(
                "lrwatch: not everything reached %s; it stays in %s, and a later watch() of the "
                "same logdir on this host uploads it",
                self.url,
                self.spool,
            )
        return done

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001  the thread must die quietly, never raise
            logger.warning("lrwatch's upload thread crashed (%r); training continues", exc)
        finally:
            self.pulled.set()

    def _loop(self) -> None:
        self._attempt("connecting", self._connect)
        if self._store is not None:
            self._attempt("reading the applied record", self._pull_applied)
            if self.control:
                self._attempt("reading the control file", self._pull_control)
        self.pulled.set()
        last_put = last_look = time.monotonic()
        retry_at = alert_until = 0.0
        while True:
            now = time.monotonic()
            every = ALERT_CONTROL_SECS if now < alert_until else CONTROL_SECS
            look = last_look + every if self.control else math.inf
            due = retry_at if retry_at > now else min(look, last_put + self.put_secs)
            if self._wake.wait(max(due - now, 0.0)):
                self._wake.clear()
                if self._urgent and not self._stop.is_set():  # let an alarm burst land at once
                    self._stop.wait(URGENT_SECS)
            stopping, now = self._stop.is_set(), time.monotonic()
            if now < retry_at and not stopping:
                continue
            if self._store is None and not self._attempt("connecting", self._connect):
                retry_at = now + RETRY_SECS
                if stopping:
                    return
                continue
            every = ALERT_CONTROL_SECS if now < alert_until else CONTROL_SECS
            if self.control and now - last_look >= every and not stopping:
                self._attempt("reading the control file", self._pull_control)
                last_look = now
            if self._urgent or stopping or now - last_put >= self.put_secs:
                if self._urgent:
                    alert_until = now + ALERT_SECS
                self._urgent = False
                ok = self._attempt("uploading", self._push)
                last_put, retry_at = now, (0.0 if ok else now + RETRY_SECS)
            if stopping:
                return

    def _attempt(self, what: str, work: Any) -> bool:
        """``work()``; a failure is one warning per kind (the spool keeps everything)."""
        try:
            work()
        except Exception as err:  # noqa: BLE001  network, credentials, a missing bucket...
            key = f"{what}: {type(err).__name__}"
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "lrwatch: %s %s failed (%s); the files stay in %s and are retried every "
                    "%g s; training continues",
                    what, self.url, err, self.spool, RETRY_SECS,
                )  # fmt: skip
            self._failing.add(what)
            return False
        if what in self._failing:
            self._failing.discard(what)
            logger.warning("lrwatch: %s %s works again", what, self.url)
        return True

    def _connect(self) -> None:
        from lrwatch.objstore.store import Store

        self._store = Store(self.url)

    # ---------------------------------------------------------------- down
    def _pull_applied(self) -> None:
        data = self._store.get(APPLIED_FILENAME, limit=MAX_CONTROL_BYTES)
        if data is not None:
            _replace(self.spool / REMOTE_APPLIED, data)

    def _pull_control(self) -> None:
        data = self._store.get(CONTROL_FILENAME, limit=MAX_CONTROL_BYTES + 1)
        if data == self._control:
            return
        path = self.spool / CONTROL_FILENAME
        if data is None:  # deleted in the bucket: as if deleted locally
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:  # over the cap: the controller refuses it as it would a local one
            _replace(path, data)
        self._control = data

    # ---------------------------------------------------------------- up
    def _push(self) -> None:
        self.pending = True
        for path in sorted(self.spool.glob("*tfevents*")):
            self._push_events(path)
        applied = self.spool / APPLIED_FILENAME
        with contextlib.suppress(FileNotFoundError):
            st = applied.stat()
            if (st.st_mtime_ns, st.st_size) != self._applied_sig:
                self._store.put(APPLIED_FILENAME, applied.read_bytes())
                self._applied_sig = (st.st_mtime_ns, st.st_size)
        self.pending = False

    def _push_events(self, path: Path) -> None:
        """Upload the new records of ``path``: the open segment again, whole, and new ones,
        each sealed once it holds SEGMENT_BYTES (a segment ends at a record boundary)."""
        index, start, sent = self._sent.get(path.name, (0, 0, 0))
        if path.stat().st_size <= sent:
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = memoryview(f.read())
        while True:
            done = sent - start
            cut = done + whole_records(data[done:], enough=max(SEGMENT_BYTES - done, 1))
            if cut == done:
                return
            self._store.put(segment_name(path.name, index), bytes(data[:cut]))
            sent = start + cut
            if cut >= SEGMENT_BYTES:  # final: the next upload starts segment index + 1
                index, start, data = index + 1, sent, data[cut:]
            self._sent[path.name] = (index, start, sent)
            _replace(self.spool / _STATE, json.dumps(self._sent).encode())


def _load_sent(path: Path) -> dict[str, tuple[int, int, int]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in doc.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return {}  # none yet, or unreadable: upload from the start (segments are rewritten)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the writer may not have made it yet
    tmp = path.with_name(f".{path.name}.{os.getpid()}.down")
    tmp.write_bytes(data)
    os.replace(tmp, path)
